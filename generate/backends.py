"""The realizer backend interface shared by the template realizer and the LLM backends.

A backend receives plans with their facts already resolved (it never reads tables) and returns, per plan,
either a realised question/answer or a rejection with its reason. Everything else -- provenance, the
`original` column, counting -- is done once in `generate.realize`, whatever the backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, Sequence

if TYPE_CHECKING:
    from generate.second_opinion import SecondOpinionStats


@dataclass(frozen=True)
class PlanFact:
    fact_id: str
    question_class: str
    answer_type: str
    values: tuple[str, ...]
    source_question: str
    source_answer: str


@dataclass(frozen=True)
class PlanInput:
    plan_id: str
    source: str
    img_id: str
    complexity: int
    facts: tuple[PlanFact, ...]


@dataclass(frozen=True)
class Realized:
    plan_id: str
    question: str
    answer: str
    # Positions in PlanInput.facts, in the order the question asks about them.
    order: tuple[int, ...]
    # Hash of the rendered prompt (LLM backends) or of the phrasing choice (template).
    prompt_hash: str = ""
    # More phrasings of the question (the optional naturalize step); each becomes a row of its own.
    variants: tuple[str, ...] = ()


@dataclass(frozen=True)
class Rejected:
    plan_id: str
    reason: str
    detail: str
    raw: str = ""


class RealizerBackend(Protocol):
    """Turns plans into natural question/answer pairs."""

    name: str
    # True when the backend writes its own text (an LLM): its questions must not be atomic questions copied
    # or an echo of its prompt (`GroundingChecker.check_question(llm=True)`).
    free_text: bool
    # The LLM second opinion's counts (`generate.second_opinion`) when the backend asks one, else None.
    second_opinion_stats: "SecondOpinionStats | None"

    def version_for(self, classes: Sequence[str]) -> str:
        """Prompt or template version recorded in the provenance of a row asking these classes."""
        ...

    def realize(self, plans: Sequence[PlanInput]) -> list[Realized | Rejected]:
        """One result per plan, in the order given."""
        ...

    def judge_and_paraphrase(self, pairs: Sequence[tuple[PlanInput, Realized]]) -> list[Realized | Rejected]:
        """Steps after the grounding check (LLM judge, paraphrases); one result per pair, in order."""
        ...
