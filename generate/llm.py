"""The LLM realizer: compose (and optionally judge and paraphrase) QA pairs through a chat transport.

Transports (`openai`, `batch`, `vllm`) only move requests and replies; everything that makes the output
trustworthy is here and shared by all of them: the request cache, structured replies validated with
pydantic, a bounded repair retry for malformed replies, refusals and failed requests turned into
rejections with the raw reply kept, and token usage counted per stage.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from generate.backends import PlanInput, Realized, Rejected
from generate.grounding import GroundingChecker
from generate.llm_cache import RequestCache, request_key
from generate.prompts import PromptTemplate, load_prompt, messages_digest
from kvqa.config import LLMConfig
from kvqa.tables import stable_hash


@dataclass(frozen=True)
class ChatRequest:
    key: str  # the cache key (a hash of `body` and the transport's `endpoint`); also the Batch API custom_id
    body: dict  # the chat-completions request body, exactly as the transport sends it (`chat_body`)

    @property
    def messages(self) -> list[dict]:
        return self.body["messages"]


def chat_body(model: str, messages: list[dict], params: dict, schema_name: str, schema: dict,
              extra: dict) -> dict:
    """The chat-completions request body: what the `openai` transport POSTs, what a Batch API JSONL line
    carries, what the `vllm` transport turns into `SamplingParams`, and what the cache key hashes.
    `extra` (the config's `extra_body` over the transport's defaults) is merged last, as the server sees it."""
    return {"model": model, "messages": messages, **params,
            "response_format": {"type": "json_schema",
                                "json_schema": {"name": schema_name, "schema": schema, "strict": True}},
            **extra}


@dataclass(frozen=True)
class ChatReply:
    content: str | None
    refusal: str | None = None
    finish_reason: str | None = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None  # the request failed after its retries; never cached

    def to_cache(self) -> dict:
        return {"content": self.content, "refusal": self.refusal, "finish_reason": self.finish_reason,
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}


OnReply = Callable[[ChatRequest, ChatReply], None]


class ChatTransport(Protocol):
    name: str
    # Where replies come from, as the cache key sees it, beyond the body: the `vllm` engine's arguments,
    # `batch`; one constant for OpenAI-compatible servers, so that any endpoint of a list (or a server
    # moved to another address) serves the same cached replies for the same model and body.
    endpoint: str
    # Body fields this transport adds to every request unless `extra_body` sets them.
    body_defaults: dict

    def complete(self, requests: Sequence[ChatRequest], stage: str, on_reply: OnReply) -> list[ChatReply]:
        """One reply per request, in order; `on_reply` is called as each reply arrives (so a run killed
        half way keeps what it paid for)."""
        ...


class ComposeReply(BaseModel):
    model_config = ConfigDict(extra="forbid")
    question: str = Field(min_length=8, max_length=400)
    answer: str = Field(min_length=2, max_length=400)


class NaturalizeReply(BaseModel):
    model_config = ConfigDict(extra="forbid")
    paraphrases: list[str]


class VerifyReply(BaseModel):
    model_config = ConfigDict(extra="forbid")
    consistent: bool
    reason: str = ""


@dataclass
class StageUsage:
    requests: int = 0
    cached: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    repairs: int = 0


@dataclass
class LLMClient:
    """Cache in front of a transport, with usage counted per stage.

    A request's cache key is the hash of its whole body as sent (model, messages, sampling parameters with
    the per-item seed, response schema, `extra_body`) and of the transport's `endpoint` (not the server URL
    of the `openai` transport: any endpoint serving the model answers for all): change any of them and the
    request is sent again; change nothing and nothing is sent.
    """

    transport: ChatTransport
    cache: RequestCache
    config: LLMConfig
    seed: int
    usage: dict[str, StageUsage] = field(default_factory=dict)

    def params(self, stage: str, item: str) -> dict:
        """Sampling parameters; the seed comes from the config seed and the item (plan) id, so two plans
        with the same facts on different images are two requests, phrased independently."""
        seed = int(stable_hash(self.seed, stage, item)[:8], 16)
        return {"temperature": self.config.temperature, "max_tokens": self.config.max_tokens, "seed": seed}

    def ask(self, stage: str, items: Sequence[str], conversations: Sequence[list[dict]],
            prompt: PromptTemplate) -> list[ChatReply]:
        usage = self.usage.setdefault(stage, StageUsage())
        extra = {**self.transport.body_defaults, **self.config.extra_body}
        requests = []
        for item, m in zip(items, conversations, strict=True):
            body = chat_body(self.config.model, m, self.params(stage, item), prompt.name, prompt.schema_, extra)
            requests.append(ChatRequest(request_key(body, self.transport.endpoint), body))
        replies: dict[str, ChatReply] = {}
        missing: dict[str, ChatRequest] = {}
        for req in requests:
            cached = self.cache.get(req.key)
            if cached is not None:
                replies[req.key] = ChatReply(**cached)
                usage.cached += 1
            else:
                missing.setdefault(req.key, req)
        if missing:
            lock = threading.Lock()

            def keep(req: ChatRequest, reply: ChatReply) -> None:  # may run in transport threads
                if reply.error is None:
                    self.cache.put(req.key, reply.to_cache())
                with lock:
                    usage.requests += 1
                    usage.prompt_tokens += reply.prompt_tokens
                    usage.completion_tokens += reply.completion_tokens

            fresh = self.transport.complete(list(missing.values()), stage, keep)
            replies.update(zip(missing, fresh))
        return [replies[r.key] for r in requests]

    def ask_structured(self, stage: str, items: Sequence[str], conversations: Sequence[list[dict]],
                       prompt: PromptTemplate, model: type[BaseModel]) -> list[BaseModel | Rejected]:
        """Ask, validate, and give malformed replies up to `max_repairs` repair turns.

        A rejection's `plan_id` is left empty for the caller to fill in.
        """
        results: list[BaseModel | Rejected | None] = [None] * len(conversations)
        pending = list(range(len(conversations)))
        convs = [list(c) for c in conversations]
        for attempt in range(self.config.max_repairs + 1):
            replies = self.ask(stage, [items[i] for i in pending], [convs[i] for i in pending], prompt)
            retry = []
            for i, reply in zip(pending, replies):
                if reply.error is not None:
                    results[i] = Rejected("", "request_failed", reply.error)
                elif reply.refusal or reply.content is None:
                    results[i] = Rejected("", "refusal", reply.refusal or f"no content ({reply.finish_reason})",
                                          reply.refusal or "")
                else:
                    try:
                        results[i] = model.model_validate_json(reply.content)
                    except ValidationError as err:
                        why = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'reply'}: {e['msg']}"
                                        for e in err.errors()[:3])
                        results[i] = Rejected("", "invalid_reply", f"after {attempt} repair(s): {why}",
                                              reply.content)
                        if attempt < self.config.max_repairs:
                            convs[i] = convs[i] + [
                                {"role": "assistant", "content": reply.content},
                                {"role": "user", "content": f"That reply is not valid ({why}). Reply again "
                                                            "with only the JSON object, matching the schema."}]
                            retry.append(i)
            self.usage[stage].repairs += len(retry)
            pending = retry
            if not pending:
                break
        return results  # type: ignore[return-value]


def facts_json(plan: PlanInput) -> str:
    return json.dumps([{"question": f.source_question, "answer": f.source_answer, "class": f.question_class}
                       for f in plan.facts], indent=1, ensure_ascii=False)


class LLMRealizer:
    """Compose with an LLM; judge and paraphrase in `review` when the config asks for it."""

    def __init__(self, client: LLMClient, checker: GroundingChecker):
        self.client = client
        self.checker = checker
        self.name = f"{client.transport.name}:{client.config.model}"
        self.compose = load_prompt("compose")
        self.verify = load_prompt("verify")
        self.naturalize = load_prompt("naturalize")

    def version_for(self, classes: Sequence[str]) -> str:
        return self.compose.version_tag

    def realize(self, plans: Sequence[PlanInput]) -> list[Realized | Rejected]:
        convs = [self.compose.render(facts=facts_json(p), k=p.complexity) for p in plans]
        out: list[Realized | Rejected] = []
        ids = [p.plan_id for p in plans]
        for plan, conv, res in zip(plans, convs, self.client.ask_structured("compose", ids, convs, self.compose,
                                                                            ComposeReply)):
            if isinstance(res, Rejected):
                out.append(Rejected(plan.plan_id, res.reason, res.detail, res.raw))
            else:
                out.append(Realized(plan.plan_id, res.question.strip(), res.answer.strip(),
                                    tuple(range(len(plan.facts))), messages_digest(conv)[:16]))
        return out

    def review(self, pairs: Sequence[tuple[PlanInput, Realized]]) -> list[Realized | Rejected]:
        results: list[Realized | Rejected] = [r for _, r in pairs]
        if self.client.config.verify:
            convs = [self.verify.render(facts=facts_json(p), question=r.question, answer=r.answer)
                     for p, r in pairs]
            verdicts = self.client.ask_structured("verify", [p.plan_id for p, _ in pairs], convs, self.verify,
                                                  VerifyReply)
            for i, ((plan, _), v) in enumerate(zip(pairs, verdicts)):
                if isinstance(v, Rejected):
                    results[i] = Rejected(plan.plan_id, f"judge_{v.reason}", v.detail, v.raw)
                elif not v.consistent:
                    results[i] = Rejected(plan.plan_id, "judge_rejected", v.reason)
        n = self.client.config.naturalize_variants
        keep = [i for i, r in enumerate(results) if isinstance(r, Realized)]
        if n and keep:
            convs = [self.naturalize.render(question=results[i].question, n=n) for i in keep]
            ids = [pairs[i][0].plan_id for i in keep]
            for i, para in zip(keep, self.client.ask_structured("naturalize", ids, convs, self.naturalize,
                                                                NaturalizeReply)):
                if isinstance(para, NaturalizeReply):
                    plan = pairs[i][0]
                    ok = tuple(dict.fromkeys(q.strip() for q in para.paraphrases[:n]
                                             if self.checker.check_question(q, plan.facts) is None
                                             and q.strip() != results[i].question))
                    r = results[i]
                    results[i] = Realized(r.plan_id, r.question, r.answer, r.order, r.prompt_hash, ok)
        return results

    @property
    def usage(self) -> dict:
        return {stage: vars(u) for stage, u in self.client.usage.items()}
