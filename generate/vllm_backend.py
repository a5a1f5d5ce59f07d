"""`vllm` transport: in-process offline batch generation with vLLM (`pip install 'kvqa[vllm]'`, a GPU).

Requests are the same chat-completions bodies the other transports send (and the cache key hashes):
the whole batch goes to one `LLM.chat` call, each body's sampling fields (its own and `extra_body`'s, e.g.
`top_p`) become its `SamplingParams`, its schema `StructuredOutputsParams(json=schema)` (the old `guided_*`
fields are gone), and its `chat_template_kwargs` the chat template's arguments: by default Qwen3's
thinking off (`enable_thinking: False`), which JSON output needs. A body field vLLM does not know fails
the run (`SamplingParams` rejects it) rather than being dropped. vLLM is imported only when this backend
is chosen; request building and reply handling are plain functions, tested without it.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from generate.llm import ChatReply, ChatRequest, OnReply
from kvqa.config import LLMConfig

# Body fields that are not sampling parameters: they go to `LLM.chat` (or name the engine's model).
NOT_SAMPLING = ("model", "messages", "response_format", "chat_template_kwargs")


class VLLMUnavailable(RuntimeError):
    pass


def sampling_kwargs(body: dict) -> dict:
    """Keyword arguments of `SamplingParams` for one request body, the schema under `structured_outputs`."""
    kw = {k: v for k, v in body.items() if k not in NOT_SAMPLING}
    kw["structured_outputs"] = {"json": body["response_format"]["json_schema"]["schema"]}
    return kw


def chat_template_kwargs(bodies: Sequence[dict], model: str) -> dict:
    """The chat-template arguments of a batch; `LLM.chat` takes one set for all requests, and the engine
    serves one model, so bodies that differ in either cannot be run as they say."""
    kwargs = {json.dumps(b.get("chat_template_kwargs") or {}, sort_keys=True) for b in bodies}
    models = {b["model"] for b in bodies}
    if len(kwargs) > 1 or models - {model}:
        raise ValueError(f"one vLLM batch needs one model ({model}) and one chat_template_kwargs; got models "
                         f"{sorted(models)} and {len(kwargs)} different chat_template_kwargs")
    return json.loads(kwargs.pop()) if kwargs else {}


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
    body_defaults = {"chat_template_kwargs": {"enable_thinking": False}}

    def __init__(self, config: LLMConfig):
        self.config = config
        # The engine's arguments (dtype, quantization, max_model_len...) can change replies: part of the key.
        self.endpoint = "vllm:" + json.dumps(config.vllm_engine, sort_keys=True, default=str)
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
            # Sampling is seeded per request (the body's `seed`); `LLMConfig` has no engine seed.
            self._llm = LLM(model=self.config.model, **self.config.vllm_engine)
        return self._llm

    def complete(self, requests: Sequence[ChatRequest], stage: str, on_reply: OnReply) -> list[ChatReply]:
        template_kwargs = chat_template_kwargs([r.body for r in requests], self.config.model)
        llm = self._engine()
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        sampling = []
        for req in requests:
            kw = sampling_kwargs(req.body)
            kw["structured_outputs"] = StructuredOutputsParams(**kw["structured_outputs"])
            sampling.append(SamplingParams(**kw))
        outputs = llm.chat([r.messages for r in requests], sampling_params=sampling, use_tqdm=True,
                           chat_template_kwargs=template_kwargs)
        replies = replies_from_outputs(outputs)
        for req, reply in zip(requests, replies):
            on_reply(req, reply)
        return replies
