"""Grounding check: does a generated question/answer state exactly what the atomic facts say? No LLM.

Applied to every realised row, whatever the backend, so an LLM that contradicts the labels (says "no
polyps" for a count of two, flips "yes" to "no", names the wrong colour or location) or asks about fewer
classes than the plan is caught and the row rejected with the reason.

Each fact is judged against the part of the answer that states it, not against the whole answer, so that
"no" in a clause about one fact cannot contradict another. An LLM gives no clause-to-fact mapping, so the
parts are found from the text:

- Spans that state another fact of the plan are masked first: that fact's values written out ("polyp
  snare" is an instrument, not a polyp; "dyed resection margins" says nothing about removal). A span of
  the judged fact's own value that contains the other span wins ("polyp" inside "a polyp" is kept).
- A mention of the judged class's noun or value that is the modifier or subject of another plan fact's
  topic word belongs to that fact: "no polyp *size* applies", "no polyps *remain*", "all polyps have been
  *removed*", "no *pathological* findings" are about size, removal and abnormalities, not a count of zero
  or a polyp. The topic words are the other class's `question_cues` and `polarity_cues` (auxiliaries such
  as "is", "have been", "to" may come between). For counts only a zero ("no", "zero", "0") is re-assigned
  this way: "one polyp measures 5 mm" still states a count of one.

The rules per answer type:

- question: for every class of the plan, every group of the class's `question_cues` matches.
- yes_no: `value_phrases` are checked first ("not applicable" states "not relevant"); otherwise the
  clauses that match a `polarity_cue` state its `affirmative` value when not negated and the other value
  when negated ("no polyps remain" states removal "yes"). At least one clause must state the value and
  none may state another.
- count: "<number> [up to two words] <noun>" mentions within one clause (digits, number words, "a
  single", "no"; a number inside "0-1" or "5-10mm" is not one); at least one, all equal to the fact.
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
# Words that may stand between a mention and the topic word of the fact it belongs to: "no polyps *to*
# remove", "all polyps *have been* removed".
LINKING = r"(?:is|are|was|were|be|been|being|has|have|had|to|of|not|yet|now|still|fully|completely|already)"
NAMED_VALUES = {AnswerType.single_choice, AnswerType.multi_choice, AnswerType.color, AnswerType.location}
# What a masked span (another fact's stated value) is replaced with: a word, so "two _ polyps" still parses.
MASK = "_"


def normalise(text: str) -> str:
    t = text.lower().replace("\u2019", "'").replace("\u2013", "-").replace("\u2014", "-")
    for uk, us in SPELLING:
        t = t.replace(uk, us)
    t = re.sub(r"\s*-\s*", "-", t)
    # The box artefact's name holds two colours that say nothing about the abnormality's colour; only the
    # box's name is joined, so "green and black abnormal tissue" keeps both colours.
    t = re.sub(r"green\s*(?:/|or|and)\s*black(?=\s+(?:box|corner|artifact|overlay))", "green-black", t)
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


def cue_words(qc: QuestionClass) -> set[str]:
    """The normalised words of a class's question cues (prefixes such as 'locat', 'classif')."""
    return {normalise(c) for group in qc.question_cues for c in group}


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
            count = re.compile(rf"(?<![\w-])(\d+|{number})(?![\w-])\s+((?:[\w-]+\s+){{0,2}}?)(?:{nouns})\b")
        return cls(
            cues=tuple(tuple(normalise(c) for c in group) for group in qc.question_cues),
            polarity=tuple((re.compile(c.pattern), c.affirmative) for c in qc.polarity_cues),
            phrases=tuple((v, tuple(re.compile(p) for p in pats)) for v, pats in qc.value_phrases.items()),
            count=count,
            values={v: re.compile("|".join(phrase_regex(f) for f in surface_forms(qc, v))) for v in qc.values},
        )


@dataclass(frozen=True)
class _Topic:
    """Another class's topic words, as seen from the class being judged (its own cue words left out)."""

    anywhere: re.Pattern  # a topic word inside a mention ("no *pathological* findings")
    after: re.Pattern  # a topic word right after a mention, linking words allowed ("no polyps *remain*")

    @classmethod
    def of(cls, judged: QuestionClass, other: QuestionClass) -> "_Topic | None":
        """The other class's question-cue words and polarity patterns, less whatever also names the judged
        class ("finding" is not abnormality presence's topic when a finding count is judged)."""
        own = cue_words(judged) | {normalise(n) for n in judged.noun or []}
        if judged.answer_type in NAMED_VALUES:
            own |= {f for v in judged.values if v != "none" for f in surface_forms(judged, v)}
        words = sorted(w for w in cue_words(other) if not any(o.startswith(w) or w.startswith(o) for o in own))
        polarity = [c.pattern for c in other.polarity_cues if not any(re.search(c.pattern, o) for o in own)]
        alternatives = [r"(?<![\w-])" + re.escape(w) for w in words] + polarity
        if not alternatives:
            return None
        topic = "(?:" + "|".join(alternatives) + ")"
        return cls(re.compile(topic), re.compile(rf"\s+(?:{LINKING}\s+){{0,3}}{topic}"))

    def owns(self, text: str, mention: re.Match, inside: str = "") -> bool:
        """Whether the mention (match in `text`, with `inside` its words between number and noun) is about
        this other class: a topic word follows it, or stands inside it."""
        return bool(self.after.match(text, mention.end()) or (inside and self.anywhere.search(inside)))


@dataclass(frozen=True)
class Violation:
    reason: str
    detail: str


class GroundingChecker:
    def __init__(self, catalog: Catalog):
        self.catalog = catalog
        self.rules = {name: _Compiled.of(qc) for name, qc in catalog.classes.items()}
        self._topics: dict[tuple[str, str], _Topic | None] = {}

    def check_question(self, question: str, facts: Sequence[PlanFact]) -> Violation | None:
        q = normalise(question)
        for fact in facts:
            missing = [g for g in self.rules[fact.question_class].cues if not any(c in q for c in g)]
            if missing:
                return Violation("question_misses_class", f"question does not ask about "
                                                          f"{fact.question_class} (none of {list(missing[0])})")
        return None

    def check(self, question: str, answer: str, facts: Sequence[PlanFact]) -> Violation | None:
        return self.check_question(question, facts) or self.check_statement(answer, facts)

    def check_statement(self, answer: str, facts: Sequence[PlanFact]) -> Violation | None:
        """The answer half of `check`: the text states every fact's value and no value contradicting one
        (also what an explanation must do for the facts it cites; see `unsupported_value`)."""
        a = normalise(answer)
        mentions = [self._value_mentions(f, a) for f in facts]
        for k, fact in enumerate(facts):
            qc = self.catalog.classes[fact.question_class]
            others = [f for f in facts if f is not fact]
            masked = [span for j, spans in enumerate(mentions) if j != k for span in spans]
            text = self._mask_others(a, fact, mentions[k], masked)
            topics = [t for t in (self._topic(qc.name, f.question_class) for f in others) if t is not None]
            other_values = {v for f in others for v in f.values}
            problem = self._check_answer(qc, list(fact.values), text, other_values, topics)
            if problem:
                return Violation("answer_contradicts_labels", f"{qc.name}={list(fact.values)}: {problem}")
        return None

    def unsupported_value(self, text: str, facts: Sequence[PlanFact], supported: frozenset[str] = frozenset()
                          ) -> Violation | None:
        """A value of a class that none of `facts` is about, named in an affirmative clause of `text`
        ("red" with no colour fact, "polyp" with no polyp fact): `check_statement` judges only the classes
        of the facts given, so a text citing some facts of an image could still invent others. Values the
        facts state (any class: "center" of an instrument location) and `supported` (e.g. the labels of the
        source boxes shown with the text) are allowed; the cited facts' own mentions are masked first, and a
        mention that belongs to a cited fact's topic ("all polyps have been removed") is not a statement."""
        a = normalise(text)
        spans = sorted(span for f in facts for span in self._value_mentions(f, a))
        out, pos = [], 0
        for s, e in spans:
            if e <= pos:
                continue
            out += [a[pos:max(s, pos)], MASK]
            pos = e
        masked = "".join(out + [a[pos:]])
        cited = {f.question_class for f in facts}
        # a cited count above zero names its object: "one polyp is in view" needs no polyp-presence fact
        counted = {n for f in facts if self.catalog.classes[f.question_class].answer_type == AnswerType.count
                   and f.values[0].isdigit() and int(f.values[0]) > 0
                   for n in self.catalog.classes[f.question_class].noun or []}
        stated = {v for f in facts for v in f.values} | set(supported) | counted
        affirmative = " | ".join(c for c in clauses(masked) if not NEGATION.search(c))
        for name, qc in self.catalog.classes.items():
            if name in cited or qc.answer_type not in NAMED_VALUES:
                continue
            if not any(p.search(affirmative) for v, p in self.rules[name].values.items()
                       if v != "none" and v not in stated):
                continue  # no candidate at all: skip the full per-clause check (most classes, most rows)
            topics = [t for t in (self._topic(name, f.question_class) for f in facts) if t is not None]
            problem = self._check_values(qc, self.rules[name], [], masked, stated, topics)
            if problem:
                return Violation("unsupported_value", f"{name}: {problem} and no fact of the image has it")
        return None

    def _topic(self, judged: str, other: str) -> _Topic | None:
        key = (judged, other)
        if key not in self._topics:
            self._topics[key] = _Topic.of(self.catalog.classes[judged], self.catalog.classes[other])
        return self._topics[key]

    def _mask_others(self, a: str, fact: PlanFact, own: list[tuple[int, int]],
                     others: list[tuple[int, int]]) -> str:
        """The answer with the spans that state other facts' values (`others`) replaced by MASK.

        A span where the judged fact states its own value (`own`) or count keeps what it contains: "one
        polyp" states the count even when the plan's abnormality fact is "polyp", and "a polyp" states the
        abnormality even when another fact names "polyp snare" elsewhere.
        """
        if not others:
            return a
        count = self.rules[fact.question_class].count
        if count is not None:
            own = own + [m.span() for m in count.finditer(a)]
        spans = sorted((s, e) for s, e in others if not any(os <= s and e <= oe for os, oe in own))
        if not spans:
            return a
        out, pos = [], 0
        for s, e in spans:
            if s < pos:  # overlapping spans of two other facts: mask their union
                pos = max(pos, e)
                continue
            out += [a[pos:s], MASK]
            pos = e
        return "".join(out + [a[pos:]])

    def _value_mentions(self, fact: PlanFact, a: str) -> list[tuple[int, int]]:
        """Where the answer names one of the fact's values; only classes whose values are names (not
        yes/no, whose "no" is a negation, nor counts)."""
        qc = self.catalog.classes[fact.question_class]
        if qc.answer_type not in NAMED_VALUES:
            return []
        rules = self.rules[qc.name]
        return [m.span() for v in fact.values if v != "none" and v in rules.values
                for m in rules.values[v].finditer(a)]

    def _check_answer(self, qc: QuestionClass, values: list[str], a: str, others: set[str],
                      topics: list[_Topic]) -> str | None:
        rules = self.rules[qc.name]
        if qc.answer_type == AnswerType.yes_no:
            return self._check_polarity(rules, values[0], a)
        if qc.answer_type == AnswerType.count:
            return self._check_count(rules, int(values[0]), a, topics)
        return self._check_values(qc, rules, values, a, others, topics)

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
    def _check_count(rules: _Compiled, n: int, a: str, topics: list[_Topic]) -> str | None:
        said = []
        for clause in clauses(a):
            for m in rules.count.finditer(clause):
                number, between = m.group(1), m.group(2)
                k = int(number) if number.isdigit() else NUMBER[number]
                # "no polyp size applies" is about the size: a zero that belongs to another fact's topic
                if k == 0 and any(t.owns(clause, m, between) for t in topics):
                    continue
                said.append(k)
        if not said:
            return "the answer gives no count"
        wrong = sorted(set(said) - {n})
        return f"the answer says {wrong}" if wrong else None

    @staticmethod
    def _check_values(qc: QuestionClass, rules: _Compiled, values: list[str], a: str,
                      others: set[str], topics: list[_Topic]) -> str | None:
        if values == ["none"]:
            if not NEGATION.search(a):
                return "the answer does not say none"
        elif qc.answer_type == AnswerType.location and len(values) == len(qc.values) - 1 and WHOLE_FRAME.search(a):
            pass
        else:
            for v in values:
                if not rules.values[v].search(a):
                    return f"{v!r} is not stated"
        # Affirmative clauses, joined with a separator no value contains, searched once per value.
        affirmative = " | ".join(c for c in clauses(a) if not NEGATION.search(c))
        for v in values:  # a stated value's words are not another value ("short-segment barrett's" != "barrett's")
            if v != "none":
                affirmative = rules.values[v].sub(" ", affirmative)
        for v in qc.values:
            if v == "none" or v in values or v in others:
                continue
            for m in rules.values[v].finditer(affirmative):
                # "all polyps have been removed" is about removal, not a polyp being present
                if not any(t.owns(affirmative, m) for t in topics):
                    return f"the answer also states {v!r}"
        return None
