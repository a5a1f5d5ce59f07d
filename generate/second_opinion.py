"""The LLM second opinion: for the plan facts the rule-based reader could not read as stated, ask the LLM
which value the answer states. Optional (`llm.second_opinion`), LLM backends only.

The grounding check (`generate.grounding`) decides every row without an LLM. A row rejected with
`answer_misses_fact` is one whose answer the reader could not read as stating a plan fact's value (a wording
the catalog lacks, a vague phrase): there the rules are uncertain. Such a row is asked again here, when the
miss is all that is wrong with it (`missed_facts`: a contradiction or an invented value anywhere in the
answer is decided, and never asked), one request per missed fact (`prompts/llm/second_opinion.yaml`: the
class's vocabulary as the reply schema's enum, or `not_stated`), through the realizer's own client (request
cache, repair turns, re-asks, usage ledger under the stage `second_opinion`).

The row is accepted only when, for every missed fact, the value read equals the fact's values exactly (a
multi-valued fact: the same set); it then goes on to the backend's `judge_and_paraphrase` like any grounded
row, and the QA table is unchanged. Otherwise it stays rejected with `answer_misses_fact`, its detail naming
what the second opinion read ("...; second opinion: polyp_count: not_stated") and its raw reply the verdicts.
Counted in `SecondOpinionStats` (asked = accepted + kept_rejected, in rows).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Annotated, Literal, Sequence, Union

from pydantic import BaseModel, ConfigDict, Field, create_model

from generate.backends import PlanFact, PlanInput, Realized, Rejected
from generate.prompts import PromptTemplate, load_prompt
from kvqa.catalog import MULTI_VALUED, AnswerType, Catalog, QuestionClass

STAGE = "second_opinion"  # the usage stage and the prompt's name
NOT_STATED = "not_stated"
UNCERTAIN = "answer_misses_fact"  # the only grounding verdict a second opinion may overturn


@dataclass(frozen=True)
class Verdict:
    """What the second opinion read for one missed fact: `read` is the values in vocabulary order (a count
    as its digits), `("not_stated",)`, or empty when no valid reply came (`error`: the rejection's reason
    and detail: a refusal, an invalid reply, a failed request)."""

    plan_id: str
    question_class: str
    expected: tuple[str, ...]
    read: tuple[str, ...]
    error: str = ""

    @property
    def agrees(self) -> bool:
        return not self.error and self.read == self.expected

    def describe(self) -> str:
        if self.error:
            return f"{self.question_class}: no verdict ({self.error})"
        said = NOT_STATED if self.read == (NOT_STATED,) else list(self.read)
        return f"{self.question_class}: {said}"


@dataclass
class SecondOpinionStats:
    """Rows asked, accepted on the second opinion, and kept rejected; `accepted_verdicts`: the verdicts the
    accepted rows carry (plan_id -> one verdict per missed fact), kept beside the QA table, not in it."""

    asked: int = 0
    accepted: int = 0
    kept_rejected: int = 0
    accepted_verdicts: dict[str, list[Verdict]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, int]:
        return {"asked": self.asked, "accepted": self.accepted, "kept_rejected": self.kept_rejected}


# --- the request ------------------------------------------------------------------------------------------

def _vocabulary(qc: QuestionClass) -> list[str]:
    return list(qc.values)


def value_schema(qc: QuestionClass) -> dict:
    """The reply's `value` for a class (the shapes of the prompt's header)."""
    if qc.answer_type == AnswerType.count:
        return {"anyOf": [{"type": "integer", "minimum": 0}, {"type": "string", "enum": [NOT_STATED]}]}
    enum = {"type": "string", "enum": _vocabulary(qc) + [NOT_STATED]}
    if qc.answer_type in MULTI_VALUED:
        return {"type": "array", "items": enum, "minItems": 1}
    return enum


def class_prompt(prompt: PromptTemplate, qc: QuestionClass) -> PromptTemplate:
    """The prompt with the class's reply schema (the file's `value: {}` filled in)."""
    schema = json.loads(json.dumps(prompt.schema_))
    schema["properties"]["value"] = value_schema(qc)
    return prompt.model_copy(update={"schema_": schema})


@lru_cache(maxsize=None)
def _reply_model(name: str, answer_type: str, vocabulary: tuple[str, ...]) -> type[BaseModel]:
    choice = Literal[vocabulary + (NOT_STATED,)]  # type: ignore[valid-type]
    if answer_type == AnswerType.count:
        value = (Union[Annotated[int, Field(ge=0)], Literal["not_stated"]], ...)
    elif answer_type in MULTI_VALUED:
        value = (Annotated[list[choice], Field(min_length=1)], ...)
    else:
        value = (choice, ...)
    return create_model(f"SecondOpinion_{name}", __config__=ConfigDict(extra="forbid"), value=value)


def reply_model(qc: QuestionClass) -> type[BaseModel]:
    """The pydantic model a reply is validated with: a value outside the class's vocabulary is an invalid
    reply (repaired, re-asked as any other), whatever the server did with the schema."""
    return _reply_model(qc.name, str(qc.answer_type), tuple(_vocabulary(qc)))


def options_text(qc: QuestionClass) -> str:
    if qc.answer_type == AnswerType.count:
        return ("Reply with value: the number the answer states (a whole number; 0 when it says there is none), "
                f'or "{NOT_STATED}".')
    options = ", ".join(json.dumps(v) for v in _vocabulary(qc))
    if qc.answer_type in MULTI_VALUED:
        none = ' ("none": the answer says there is none)' if "none" in qc.values else ""
        return (f"Options: {options}{none}. Reply with value: a list of every option the answer states, "
                f'or ["{NOT_STATED}"].')
    return f'Options: {options}. Reply with value: the one option the answer states, or "{NOT_STATED}".'


def _read(qc: QuestionClass, value) -> tuple[str, ...]:
    if value == NOT_STATED or value == [NOT_STATED]:
        return (NOT_STATED,)
    if qc.answer_type == AnswerType.count:
        return (str(int(value)),)
    if isinstance(value, list):
        values = set(value)
        rank = {v: i for i, v in enumerate(_vocabulary(qc) + [NOT_STATED])}
        return tuple(sorted(values, key=rank.__getitem__))
    return (value,)


def _expected(qc: QuestionClass, fact: PlanFact) -> tuple[str, ...]:
    if qc.answer_type == AnswerType.count:
        return (str(int(fact.values[0])),)
    if qc.answer_type in MULTI_VALUED:
        return tuple(sorted(set(fact.values), key=qc.sort_key))
    return tuple(fact.values)


def second_opinion(client, catalog: Catalog, items: Sequence[tuple[PlanInput, Realized, PlanFact]],
                   prompt: PromptTemplate | None = None) -> list[Verdict]:
    """One verdict per item (plan, realized pair, missed fact), in order: one request each, through
    `client.ask_structured` (stage `second_opinion`; the item id is `<plan_id>:<class>`, so the seed and the
    cache key are the fact's own)."""
    prompt = prompt or load_prompt(STAGE)
    verdicts: list[Verdict | None] = [None] * len(items)
    by_class: dict[str, list[int]] = {}
    for i, (_, _, fact) in enumerate(items):
        by_class.setdefault(fact.question_class, []).append(i)
    for name, positions in by_class.items():
        qc = catalog.classes[name]
        template = class_prompt(prompt, qc)
        convs = [template.render(question=items[i][1].question, answer=items[i][1].answer, class_name=name,
                                 atomic_question=items[i][2].source_question or qc.atomic_question,
                                 options=options_text(qc))
                 for i in positions]
        ids = [f"{items[i][0].plan_id}:{name}" for i in positions]
        replies = client.ask_structured(STAGE, ids, convs, template, reply_model(qc))
        for i, reply in zip(positions, replies):
            plan, _, fact = items[i]
            expected = _expected(qc, fact)
            if isinstance(reply, Rejected):
                verdicts[i] = Verdict(plan.plan_id, name, expected, (), f"{reply.reason}: {reply.detail}"[:200])
            else:
                verdicts[i] = Verdict(plan.plan_id, name, expected, _read(qc, reply.value))
    return verdicts  # type: ignore[return-value]


# --- the rows ---------------------------------------------------------------------------------------------

def missed_facts(checker, answer: str, facts: Sequence[PlanFact],
                 image_facts: Sequence[PlanFact]) -> list[PlanFact] | None:
    """The plan facts the rules read as not stated (or only hedged), when that is all that is wrong with the
    answer; None when nothing is missed or something else is (a contradiction of any fact of the image, a
    value the image has no fact of): decided by the rules, never asked."""
    image = [*image_facts, *facts]
    missed = [f for f in facts
              if (v := checker.check_statement(answer, [f], image)) is not None and v.reason == UNCERTAIN]
    if not missed:
        return None
    # the rest of the verdict with the missed facts held only to "no contradiction", as image facts
    if checker.check_statement(answer, [f for f in facts if f not in missed], image) is not None:
        return None
    return missed


def recheck(client, checker, rows: Sequence[tuple[PlanInput, Realized, object, Sequence[PlanFact]]],
            stats: SecondOpinionStats, prompt: PromptTemplate | None = None) -> list[Realized | Rejected]:
    """Rows the grounding check rejected with `answer_misses_fact` ((plan, pair, violation, image facts)):
    the pair itself where the second opinion reads every missed fact's value, else the rejection, its
    detail saying what the second opinion read. Rows whose answer has more wrong than a miss keep the
    check's rejection and are not asked (nor counted)."""
    out: list[Realized | Rejected | None] = [None] * len(rows)
    asked: list[tuple[int, list[PlanFact]]] = []
    for n, (plan, res, violation, image) in enumerate(rows):
        missed = missed_facts(checker, res.answer, plan.facts, image)
        if missed is None:
            out[n] = Rejected(plan.plan_id, violation.reason, violation.detail,
                              json.dumps({"question": res.question, "answer": res.answer}))
        else:
            asked.append((n, missed))
    items = [(rows[n][0], rows[n][1], f) for n, missed in asked for f in missed]
    verdicts = iter(second_opinion(client, checker.catalog, items, prompt) if items else [])
    for n, missed in asked:
        plan, res, violation, _ = rows[n]
        mine = [next(verdicts) for _ in missed]
        stats.asked += 1
        if all(v.agrees for v in mine):
            stats.accepted += 1
            stats.accepted_verdicts[plan.plan_id] = mine
            out[n] = res
            continue
        stats.kept_rejected += 1
        said = "; ".join(v.describe() for v in mine)
        raw = {"question": res.question, "answer": res.answer,
               "second_opinion": {v.question_class: (list(v.read) if not v.error else None) for v in mine}}
        out[n] = Rejected(plan.plan_id, UNCERTAIN, f"{violation.detail}; second opinion: {said}",
                          json.dumps(raw, ensure_ascii=False))
    return out  # type: ignore[return-value]
