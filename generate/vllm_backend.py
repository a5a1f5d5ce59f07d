"""`vllm` transport: in-process offline batch generation with vLLM (`pip install 'kvqa[vllm]'`, a GPU).

The whole batch goes to one `LLM.chat` call with per-request `SamplingParams` carrying
`StructuredOutputsParams(json=schema)` (the old `guided_*` fields are gone), and Qwen3's thinking is turned
off through the chat template (`enable_thinking: False`), which JSON output needs. vLLM is imported only
when this backend is chosen; request building and reply handling are plain functions, tested without it.
"""

from __future__ import annotations

from typing import Any, Sequence

from generate.llm import ChatReply, ChatRequest, OnReply
from kvqa.config import LLMConfig


class VLLMUnavailable(RuntimeError):
    pass


def sampling_kwargs(req: ChatRequest) -> dict:
    """Keyword arguments of `SamplingParams` for one request, the schema under `structured_outputs`."""
    return {**req.params, "structured_outputs": {"json": req.schema}}


def replies_from_outputs(outputs: Sequence[Any]) -> list[ChatReply]:
    """vLLM `RequestOutput`s -> replies (text of the first completion, token counts)."""
    replies = []
    for out in outputs:
        comp = out.outputs[0]
        replies.append(ChatReply(content=comp.text, finish_reason=comp.finish_reason,
                                 prompt_tokens=len(out.prompt_token_ids or []),
                                 completion_tokens=len(comp.token_ids or [])))
    return replies


class VLLMTransport:
    name = "vllm"

    def __init__(self, config: LLMConfig):
        self.config = config
        self._llm = None

    def _engine(self):
        try:
            import torch
            from vllm import LLM
        except ImportError as err:
            raise VLLMUnavailable("the vllm backend needs the extra: pip install 'kvqa[vllm]'") from err
        if not torch.cuda.is_available():
            raise VLLMUnavailable("the vllm backend needs a CUDA GPU; use backend 'openai' against a "
                                  "`vllm serve` elsewhere, or 'batch' with `vllm run_batch`")
        if self._llm is None:
            self._llm = LLM(model=self.config.model, seed=self.config.seed, **self.config.vllm_engine)
        return self._llm

    def complete(self, requests: Sequence[ChatRequest], stage: str, on_reply: OnReply) -> list[ChatReply]:
        llm = self._engine()
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        sampling = []
        for req in requests:
            kw = sampling_kwargs(req)
            kw["structured_outputs"] = StructuredOutputsParams(**kw["structured_outputs"])
            sampling.append(SamplingParams(**kw))
        outputs = llm.chat([r.messages for r in requests], sampling_params=sampling, use_tqdm=True,
                           chat_template_kwargs={"enable_thinking": False})
        replies = replies_from_outputs(outputs)
        for req, reply in zip(requests, replies):
            on_reply(req, reply)
        return replies
