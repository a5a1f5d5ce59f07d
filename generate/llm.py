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
from pathlib import Path
from typing import Callable, Protocol, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from generate.backends import PlanInput, Realized, Rejected
from generate.grounding import GroundingChecker, answer_naturalness
from generate.second_opinion import SecondOpinionStats
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
    """One execution of a stage: requests sent (failed ones included), replies from the cache, tokens, repair
    turns, and requests that failed in transport (never cached: a re-run sends them again)."""

    requests: int = 0
    cached: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    repairs: int = 0
    failed: int = 0


class UsageLedger:
    """Every request a run sent, one JSON line per reply as it arrives (flushed, like the request cache):
    the run's usage totals over all executions of its stages, a killed or re-run one included.

    `report.json`'s `llm_usage` showed only the last execution, where the replies paid for before count as
    `cached`; a stage killed half way left no count at all.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = None
        self._lock = threading.Lock()

    def record(self, stage: str, reply: ChatReply) -> None:
        line = json.dumps({"stage": stage, "prompt_tokens": reply.prompt_tokens,
                           "completion_tokens": reply.completion_tokens, "failed": reply.error is not None})
        with self._lock:
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "a", encoding="utf-8")
            self._file.write(line + "\n")
            self._file.flush()

    def totals(self) -> dict[str, dict[str, int]]:
        """Per stage: requests sent, failed, prompt and completion tokens, over every execution."""
        out: dict[str, dict[str, int]] = {}
        if not self.path.is_file():
            return out
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
                t = out.setdefault(entry["stage"], {"requests": 0, "failed": 0, "prompt_tokens": 0,
                                                    "completion_tokens": 0})
                t["requests"] += 1
                t["failed"] += int(bool(entry["failed"]))
                t["prompt_tokens"] += int(entry["prompt_tokens"])
                t["completion_tokens"] += int(entry["completion_tokens"])
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line of a killed run
        return out


@dataclass
class LLMClient:
    """Cache in front of a transport, with usage counted per stage.

    A request's cache key is the hash of its whole body as sent (model, messages, sampling parameters with
    the per-item seed, response schema, `extra_body`) and of the transport's `endpoint` (not the server URL
    of the `openai` transport: any endpoint serving the model answers for all): change any of them and the
    request is sent again; change nothing and nothing is sent. Replies that failed in transport are never
    cached, so the next run sends exactly those again.
    """

    transport: ChatTransport
    cache: RequestCache
    config: LLMConfig
    seed: int
    ledger: UsageLedger | None = None
    usage: dict[str, StageUsage] = field(default_factory=dict)

    def usage_report(self) -> dict:
        """`llm_usage` of a stage summary: per LLM stage, the totals over all executions of the run's stage
        (from the ledger; this execution's alone without one) and this execution's figures under
        `last_execution`."""
        totals = self.ledger.totals() if self.ledger is not None else {}
        return {stage: {**totals.get(stage, {k: getattr(u, k) for k in ("requests", "failed", "prompt_tokens",
                                                                         "completion_tokens")}),
                        "last_execution": vars(u)}
                for stage, u in self.usage.items()}

    def failed_requests(self) -> int:
        """Requests of this execution that failed in transport: the stage is redone on the next run."""
        return sum(u.failed for u in self.usage.values())

    def params(self, stage: str, item: str, reask: int = 0) -> dict:
        """Sampling parameters; the seed comes from the config seed and the item (plan) id, so two plans
        with the same facts on different images are two requests, phrased independently (and from the
        re-ask round: a re-asked request is a new one). `send_seed: false` leaves it out of the body."""
        params = {"temperature": self.config.temperature, "max_tokens": self.config.max_tokens}
        if self.config.send_seed:
            params["seed"] = int(stable_hash(self.seed, stage, item, *([reask] if reask else []))[:8], 16)
        return params

    def ask(self, stage: str, items: Sequence[str], conversations: Sequence[list[dict]],
            prompt: PromptTemplate, max_tokens: Sequence[int | None] | None = None,
            reask: int = 0) -> list[ChatReply]:
        """One reply per conversation, from the cache where it holds one. `max_tokens` overrides the
        config's per item (a repair of a truncated reply); `reask` is the re-ask round (its number is in
        the key even when the body has no seed)."""
        usage = self.usage.setdefault(stage, StageUsage())
        extra = {**self.transport.body_defaults, **self.config.extra_body}
        requests = []
        for n, (item, m) in enumerate(zip(items, conversations, strict=True)):
            params = self.params(stage, item, reask)
            if max_tokens is not None and max_tokens[n] is not None:
                params["max_tokens"] = max_tokens[n]
            body = chat_body(self.config.model, m, params, prompt.name, prompt.schema_, extra)
            endpoint = self.transport.endpoint + (f"#reask{reask}" if reask else "")
            requests.append(ChatRequest(request_key(body, endpoint), body))
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
                if self.ledger is not None:
                    self.ledger.record(stage, reply)
                with lock:
                    usage.requests += 1
                    usage.failed += reply.error is not None
                    usage.prompt_tokens += reply.prompt_tokens
                    usage.completion_tokens += reply.completion_tokens

            fresh = self.transport.complete(list(missing.values()), stage, keep)
            replies.update(zip(missing, fresh))
        return [replies[r.key] for r in requests]

    def ask_structured(self, stage: str, items: Sequence[str], conversations: Sequence[list[dict]],
                       prompt: PromptTemplate, model: type[BaseModel]) -> list[BaseModel | Rejected]:
        """Ask and validate; a refused, invalid or truncated reply is asked again `reask_rejected` times
        with a fresh seed. A rejection's `plan_id` is left empty for the caller to fill in."""
        results = self._ask_repairing(stage, items, conversations, prompt, model, 0)
        for round_ in range(1, self.config.reask_rejected + 1):
            again = [i for i, r in enumerate(results) if isinstance(r, Rejected) and r.reason in REASKED]
            if not again:
                break
            for i, res in zip(again, self._ask_repairing(stage, [items[i] for i in again],
                                                         [conversations[i] for i in again], prompt, model,
                                                         round_)):
                results[i] = res
        return results

    def _ask_repairing(self, stage: str, items: Sequence[str], conversations: Sequence[list[dict]],
                       prompt: PromptTemplate, model: type[BaseModel], reask: int) -> list[BaseModel | Rejected]:
        """Ask, validate, and give malformed replies up to `max_repairs` repair turns; a reply cut at
        `max_tokens` (finish_reason=length) is named so, and its repair turn may use twice the tokens."""
        results: list[BaseModel | Rejected | None] = [None] * len(conversations)
        pending = list(range(len(conversations)))
        convs = [list(c) for c in conversations]
        limits: list[int | None] = [None] * len(conversations)
        for attempt in range(self.config.max_repairs + 1):
            replies = self.ask(stage, [items[i] for i in pending], [convs[i] for i in pending], prompt,
                               [limits[i] for i in pending], reask)
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
                        continue
                    except ValidationError as err:
                        why = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'reply'}: {e['msg']}"
                                        for e in err.errors()[:3])
                    tokens = limits[i] or self.config.max_tokens
                    if reply.finish_reason == "length":
                        results[i] = Rejected("", "truncated", f"finish_reason=length at max_tokens={tokens}, "
                                              f"after {attempt} repair(s): {why}", reply.content)
                        note = (f"That reply was cut off at {tokens} tokens before the JSON object ended. "
                                "Reply again with only the complete JSON object, matching the schema.")
                        limits[i] = 2 * tokens  # resending the same limit gave the same cut 19 times of 25
                    else:
                        results[i] = Rejected("", "invalid_reply", f"after {attempt} repair(s): {why}",
                                              reply.content)
                        note = (f"That reply is not valid ({why}). Reply again with only the JSON object, "
                                "matching the schema.")
                    if attempt < self.config.max_repairs:
                        convs[i] = convs[i] + [{"role": "assistant", "content": reply.content},
                                               {"role": "user", "content": note}]
                        retry.append(i)
            self.usage[stage].repairs += len(retry)
            pending = retry
            if not pending:
                break
        return results  # type: ignore[return-value]


# The rejections `reask_rejected` asks again: what the model said. A failed request is not among them: it
# is never cached, so every run sends it again anyway.
REASKED = ("refusal", "invalid_reply", "truncated")


def facts_json(plan: PlanInput) -> str:
    return json.dumps([{"question": f.source_question, "answer": f.source_answer, "class": f.question_class}
                       for f in plan.facts], indent=1, ensure_ascii=False)


class LLMRealizer:
    """Compose with an LLM; judge and paraphrase in `judge_and_paraphrase` when the config asks for it."""

    def __init__(self, client: LLMClient, checker: GroundingChecker):
        self.client = client
        self.checker = checker
        self.name = f"{client.transport.name}:{client.config.model}"
        self.free_text = True
        self.second_opinion_stats = SecondOpinionStats() if client.config.second_opinion else None
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

    def judge_and_paraphrase(self, pairs: Sequence[tuple[PlanInput, Realized]]) -> list[Realized | Rejected]:
        results: list[Realized | Rejected] = [self._natural(p, r) for p, r in pairs]
        if self.client.config.verify:
            pending = [i for i, r in enumerate(results) if isinstance(r, Realized)]
            convs = [self.verify.render(facts=facts_json(pairs[i][0]), question=results[i].question,
                                        answer=results[i].answer) for i in pending]
            verdicts = self.client.ask_structured("verify", [pairs[i][0].plan_id for i in pending], convs,
                                                  self.verify, VerifyReply)
            for i, v in zip(pending, verdicts):
                plan = pairs[i][0]
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
                                             if self.checker.check_question(q, plan.facts, llm=True) is None
                                             and q.strip() != results[i].question))
                    r = results[i]
                    results[i] = Realized(r.plan_id, r.question, r.answer, r.order, r.prompt_hash, ok)
        return results

    def _natural(self, plan: PlanInput, res: Realized) -> Realized | Rejected:
        """Naturalness, judged apart from grounding (`answer_naturalness`): a label-only answer ("no", "1") is
        right, and not what a dataset of natural answers wants."""
        cfg = self.client.config
        violation = answer_naturalness(res.answer, cfg.min_answer_words, cfg.max_answer_words)
        if violation:
            return Rejected(plan.plan_id, violation.reason, violation.detail,
                            json.dumps({"question": res.question, "answer": res.answer}))
        return res

    @property
    def usage(self) -> dict:
        return self.client.usage_report()
