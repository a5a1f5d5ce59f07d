"""Grounding check: does a generated question/answer state exactly what the atomic facts say? No LLM.

Applied to every realised row, whatever the backend, so an LLM that contradicts the labels (says "no
polyps" for a count of two, flips "yes" to "no", names the wrong colour or location) or asks about fewer
classes than the plan is caught and the row rejected with the reason. The rules per answer type:

- question: for every class of the plan, every group of the class's `question_cues` matches.
- yes_no: `value_phrases` are checked first ("not applicable" states "not relevant"); otherwise the
  clauses that match a `polarity_cue` state its `affirmative` value when not negated and the other value
  when negated ("no polyps remain" states removal "yes"). At least one clause must state the value and
  none may state another.
- count: "<number> [up to two words] <noun>" mentions (digits, number words, "a single", "no"); at least
  one, all equal to the fact.
- single/multi choice, colour, location: every value must appear (as its canonical name, display name or
  a synonym; "none" needs a negation); no other value of the vocabulary may appear in an affirmative
  clause unless another fact of the same plan has it. All nine grid cells may be stated as "the whole
  frame" and the like.

Texts are normalised first (lower case, British to American spelling, dashes, "5 - 10 mm" -> "5-10mm").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from generate.backends import PlanFact
from generate.template import NUMBER_WORDS
from kvqa.catalog import AnswerType, Catalog, QuestionClass

NEGATION = re.compile(r"\b(?:no|not|none|without|absent|neither|nor|free of|never)\b|n't\b")
CLAUSE_SPLIT = re.compile(r"[,;:.]|\band\b|\bbut\b|\bwhile\b|\bwhereas\b")
WHOLE_FRAME = re.compile(r"\b(?:whole|entire|all regions|all areas|throughout|every region|everywhere|"
                         r"across all|all nine|all parts)\b")
# "a polyp" is not a count ("a polyp present" answers abnormality presence); "a single polyp" is.
NUMBER = {w: i for i, w in enumerate(NUMBER_WORDS)} | {"no": 0, "a single": 1, "single": 1}
SPELLING = [("colour", "color"), ("centre", "center"), ("artefact", "artifact"), ("oesophag", "esophag"),
            ("haemorrhoid", "hemorrhoid"), ("caecum", "cecum"), ("rigth", "right")]


def normalise(text: str) -> str:
    t = text.lower().replace("\u2019", "'").replace("\u2013", "-").replace("\u2014", "-")
    for uk, us in SPELLING:
        t = t.replace(uk, us)
    t = re.sub(r"\s*-\s*", "-", t)
    # The box artefact's name holds two colours that say nothing about the abnormality's colour.
    t = re.sub(r"green\s*(?:/|or|and)\s*black", "green-black", t)
    t = re.sub(r"(\d)\s*mm\b", r"\1mm", t)
    return " ".join(t.split())


def clauses(text: str) -> list[str]:
    return [c.strip() for c in CLAUSE_SPLIT.split(text) if c.strip()]


def phrase_regex(phrase: str) -> str:
    """A phrase as a whole token sequence; hyphens are part of tokens, so 'center' misses 'upper-center'."""
    return r"(?<![\w-])" + re.escape(phrase) + r"s?(?![\w-])"


def surface_forms(qc: QuestionClass, value: str) -> tuple[str, ...]:
    """Every normalised way of writing a value: canonical, display name, synonyms."""
    spec = qc.values.get(value)
    forms = [value] + ([spec.display] if spec and spec.display else []) + (spec.synonyms if spec else [])
    out = {normalise(f) for f in forms}
    out |= {f[2:] for f in out if f.startswith("a ")}  # "a polyp" -> "polyp"
    return tuple(sorted(out, key=len, reverse=True))


@dataclass(frozen=True)
class _Compiled:
    """A class's rules compiled once: the check runs on every generated row."""

    cues: tuple[tuple[str, ...], ...]
    polarity: tuple[tuple[re.Pattern, str], ...]
    phrases: tuple[tuple[str, tuple[re.Pattern, ...]], ...]
    count: re.Pattern | None
    values: dict[str, re.Pattern]

    @classmethod
    def of(cls, qc: QuestionClass) -> "_Compiled":
        count = None
        if qc.noun:
            number = "|".join(sorted((re.escape(w) for w in NUMBER), key=len, reverse=True))
            nouns = "|".join(re.escape(n) for n in sorted(set(qc.noun), key=len, reverse=True))
            count = re.compile(rf"\b(\d+|{number})\s+(?:[\w-]+\s+){{0,2}}?(?:{nouns})\b")
        return cls(
            cues=tuple(tuple(normalise(c) for c in group) for group in qc.question_cues),
            polarity=tuple((re.compile(c.pattern), c.affirmative) for c in qc.polarity_cues),
            phrases=tuple((v, tuple(re.compile(p) for p in pats)) for v, pats in qc.value_phrases.items()),
            count=count,
            values={v: re.compile("|".join(phrase_regex(f) for f in surface_forms(qc, v))) for v in qc.values},
        )


@dataclass(frozen=True)
class Violation:
    reason: str
    detail: str


class GroundingChecker:
    def __init__(self, catalog: Catalog):
        self.catalog = catalog
        self.rules = {name: _Compiled.of(qc) for name, qc in catalog.classes.items()}

    def check_question(self, question: str, facts: Sequence[PlanFact]) -> Violation | None:
        q = normalise(question)
        for fact in facts:
            missing = [g for g in self.rules[fact.question_class].cues if not any(c in q for c in g)]
            if missing:
                return Violation("question_misses_class", f"question does not ask about "
                                                          f"{fact.question_class} (none of {list(missing[0])})")
        return None

    def check(self, question: str, answer: str, facts: Sequence[PlanFact]) -> Violation | None:
        violation = self.check_question(question, facts)
        if violation:
            return violation
        a = normalise(answer)
        for fact in facts:
            qc = self.catalog.classes[fact.question_class]
            others = {v for f in facts if f is not fact for v in f.values}
            problem = self._check_answer(qc, list(fact.values), a, others)
            if problem:
                return Violation("answer_contradicts_labels", f"{qc.name}={list(fact.values)}: {problem}")
        return None

    def _check_answer(self, qc: QuestionClass, values: list[str], a: str, others: set[str]) -> str | None:
        rules = self.rules[qc.name]
        if qc.answer_type == AnswerType.yes_no:
            return self._check_polarity(rules, values[0], a)
        if qc.answer_type == AnswerType.count:
            return self._check_count(rules, int(values[0]), a)
        return self._check_values(qc, rules, values, a, others)

    @staticmethod
    def _check_polarity(rules: _Compiled, value: str, a: str) -> str | None:
        stated: list[str] = []
        for clause in clauses(a):
            phrase_value = next((v for v, pats in rules.phrases if any(p.search(clause) for p in pats)), None)
            if phrase_value:
                stated.append(phrase_value)
                continue
            for pattern, affirmative in rules.polarity:
                if pattern.search(clause):
                    if NEGATION.search(clause):
                        stated.append("no" if affirmative == "yes" else "yes")
                    else:
                        stated.append(affirmative)
                    break
        if not stated:
            return "the answer does not state it"
        wrong = sorted(set(stated) - {value})
        return f"the answer states {wrong}" if wrong else None

    @staticmethod
    def _check_count(rules: _Compiled, n: int, a: str) -> str | None:
        said = [int(m) if m.isdigit() else NUMBER[m] for m in rules.count.findall(a)]
        if not said:
            return "the answer gives no count"
        wrong = sorted(set(said) - {n})
        return f"the answer says {wrong}" if wrong else None

    @staticmethod
    def _check_values(qc: QuestionClass, rules: _Compiled, values: list[str], a: str,
                      others: set[str]) -> str | None:
        if values == ["none"]:
            if not NEGATION.search(a):
                return "the answer does not say none"
        elif qc.answer_type == AnswerType.location and len(values) == len(qc.values) - 1 and WHOLE_FRAME.search(a):
            pass
        else:
            for v in values:
                if not rules.values[v].search(a):
                    return f"{v!r} is not stated"
        affirmative = " | ".join(c for c in clauses(a) if not NEGATION.search(c))
        for v in values:  # a stated value's words are not another value ("short-segment barrett's" != "barrett's")
            if v != "none":
                affirmative = rules.values[v].sub(" ", affirmative)
        for v in qc.values:
            if v == "none" or v in values or v in others:
                continue
            if rules.values[v].search(affirmative):
                return f"the answer also states {v!r}"
        return None
