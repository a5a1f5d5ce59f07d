"""The deterministic template realizer: the offline default backend.

Phrasings come from the catalog. For a plan, draws hashed from (config seed, plan_id) pick the order
in which the facts are asked about, one question phrasing and one answer phrasing per fact. A composed
question coordinates the k questions into one ("A, b, and c?"), never "Q1? Q2?"; the answer joins one
clause per fact, each stating that fact's values, so it is consistent with every fact by construction.
"""

from __future__ import annotations

from typing import Sequence

from generate.backends import PlanFact, PlanInput, Realized, Rejected
from kvqa.catalog import MULTI_VALUED, AnswerType, Catalog, QuestionClass
from kvqa.tables import HashDraws

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
                "nineteen", "twenty"]


def number_word(n: int) -> str:
    return NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else str(n)


def join_list(items: Sequence[str], oxford: bool = False) -> str:
    """'a', 'a and b', 'a, b and c' (or 'a, b, and c' with the serial comma, for joining clauses)."""
    items = list(items)
    if len(items) <= 2:
        return " and ".join(items)
    return f"{', '.join(items[:-1])}{',' if oxford else ''} and {items[-1]}"


def lower_first(text: str) -> str:
    """Lower-case a leading capital unless it starts an acronym or a proper name ("IIa", "Z-line")."""
    if len(text) > 1 and text[0].isupper() and text[1].islower():
        return text[0].lower() + text[1:]
    return text


def upper_first(text: str) -> str:
    return text[:1].upper() + text[1:]


def answer_key(qc: QuestionClass, values: Sequence[str]) -> str:
    """Which answer-template list of the class describes these values (see the catalog header)."""
    if qc.answer_type == AnswerType.count:
        n = int(values[0])
        return "zero" if n == 0 else "one" if n == 1 else "many"
    if qc.answer_type == AnswerType.yes_no:
        return values[0]
    if qc.answer_type == AnswerType.single_choice:
        return values[0] if values[0] in qc.answers else "value"
    if list(values) == ["none"]:
        return "none"
    full = [v for v in qc.values if v != "none"]
    if "all" in qc.answers and sorted(values) == sorted(full):
        return "all"
    return "values"


def render_answer_clause(qc: QuestionClass, values: Sequence[str], template: str) -> str:
    shown = [qc.display(v) for v in values]
    n = int(values[0]) if qc.answer_type == AnswerType.count else 0
    return template.format(value=shown[0], values=join_list(shown), n=n, n_word=number_word(n),
                           s="s" if len(shown) > 1 else "")


def compose_question(questions: Sequence[str]) -> str:
    """One coordinated question: 'A?', 'A and b?', 'A, b, and c?'."""
    parts = [q.strip().rstrip("?").strip() for q in questions]
    return upper_first(join_list([parts[0]] + [lower_first(p) for p in parts[1:]], oxford=True)) + "?"


def compose_answer(clauses: Sequence[str]) -> str:
    """One concise answer: 'A.', 'A and b.', 'A, b, and c.'."""
    return upper_first(join_list([c.strip().rstrip(".") for c in clauses], oxford=True)) + "."


class TemplateRealizer:
    """Realises plans from the catalog's phrasings; no model, no network, fully deterministic."""

    name = "template"
    free_text = False
    second_opinion_stats = None

    def __init__(self, catalog: Catalog, seed: int):
        self.catalog = catalog
        self.seed = seed

    def version_for(self, classes: Sequence[str]) -> str:
        # Only the entries a row was realised from: adding a class must not change the other rows.
        return self.catalog.classes_version(classes)

    def realize(self, plans: Sequence[PlanInput]) -> list[Realized | Rejected]:
        return [self.realize_one(p) for p in plans]

    def judge_and_paraphrase(self, pairs: Sequence[tuple[PlanInput, Realized]]) -> list[Realized | Rejected]:
        return [r for _, r in pairs]  # templates need no judge: they are grounded by construction

    def realize_one(self, plan: PlanInput) -> Realized | Rejected:
        draws = HashDraws(self.seed, "template", plan.plan_id)
        order = tuple(draws.permutation(len(plan.facts)))
        questions, clauses = [], []
        for i in order:
            fact: PlanFact = plan.facts[i]
            qc = self.catalog.classes.get(fact.question_class)
            if qc is None:
                return Rejected(plan.plan_id, "unknown_class", f"{fact.question_class!r} is not in the catalog")
            if qc.answer_type not in MULTI_VALUED and len(fact.values) != 1:
                return Rejected(plan.plan_id, "bad_fact", f"{qc.name} needs one value, got {fact.values}")
            key = answer_key(qc, fact.values)
            if key not in qc.answers:
                return Rejected(plan.plan_id, "no_template", f"{qc.name} has no answer template {key!r}")
            questions.append(qc.questions[draws.below(len(qc.questions))])
            templates = qc.answers[key]
            clauses.append(render_answer_clause(qc, fact.values, templates[draws.below(len(templates))]))
        return Realized(plan.plan_id, compose_question(questions), compose_answer(clauses), order)
