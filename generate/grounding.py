"""Grounding check: does a generated question ask about exactly the plan's classes, and does its answer state
every fact of the plan and nothing contrary to any fact of the image? No LLM.

Applied to every realised row, whatever the backend, and to paraphrases and explanations. The text is read
by `generate.reader` (what it asserts, denies and only hedges, per class); the verdicts:

- **question** (`check_question`): every plan class is asked (each group of its `question_cues` matches as
  a word or, with `*`, a word start: "text" is not in "texture"; a none or zero fact is also asked by a
  question about its object: "Is there any instrument?" asks where an absent instrument is; a presence class
  by naming one of its values: "any signs of ulcerative colitis?"), and no other class is
  (`question_off_target`: every cue group of a class outside the plan matches words the plan's cues do not
  explain: "Is there text and how large is the polyp?" for a text fact). For LLM text also: a verbatim copy
  of an atomic question (`question_copies_atomic`: naturalizing is the point of the LLM step) and a prompt
  echo (`question_echoes_prompt`).
- **answer** (`check_statement`), per plan fact: its value asserted (`answer_misses_fact` when it is only
  hedged, "one or two polyps", or not said); nothing that contradicts it (`answer_contradicts_labels`: a
  denied value, another value asserted, a count outside the interval stated). The image's other facts are
  held to the second rule too, and a value of a class the image has no fact of is an invented finding
  (`unsupported_value`). A terse answer that is the label ("no", "1") states it: whether it is too terse for
  an LLM row is a naturalness question the LLM backend asks apart (`answer_too_terse`, `llm.min_answer_words`),
  never a contradiction.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

from generate.backends import PlanFact
from generate.prompts import load_prompt
from generate.reader import NAMED_VALUES, NUMBERS, Reader, Reading, Statement, reading_form
from kvqa.catalog import AnswerType, Catalog, QuestionClass

__all__ = ["GroundingChecker", "Violation", "cue_regex", "reading_form"]

TERSE_WORDS = {"not applicable": "not relevant", "n/a": "not relevant"}
# What a reply that talks about its task instead of asking says: a preamble ("Sure! Here's the rewritten
# question:"), markup, the prompt's own words, a label before the question ("Output: Is ...").
ECHO_MARKERS = re.compile(r"\bjson\b|[{}\[\]<>]|\bfacts?\b.*\batomic\b|\batomic question|\brewr[io]te|\bparaphras|"
                          r"\bthe following\b|^(?:question|answer|output|input|sure|certainly|okay|ok|here)\b|"
                          r"\bas an ai\b|\blanguage model\b|\bhere(?: is|'s)\b|\bcombine[ds]?\b.*\bquestion|"
                          r"\bnatural question\b|\bi would (?:phrase|ask|write)\b|\bfacts?\b|"
                          r"\bdo you\b|\byou are\b|\bare you\b|\bthe user\b|\byour\b|"
                          r":\s*(?:is|are|what|which|how|where|does|do|has|have|can|was|were|in)\b")
ECHO_MAX_CHARS = 300
ANY_RE = re.compile(r"\bany\b")
# A part of a question that asks whether something is there.
PRESENCE_ASKED = re.compile(r"\b(?:is|are|was|were) there\b|\bany\b|\b(?:does|do|did) (?:the|this) (?:image|frame|view|picture) "
                            r"(?:show|contain|include)|\bvisible\b|\bpresent\b|\bseen\b")
LLM_PROMPTS = ("compose", "naturalize", "verify", "explain")
# The parts of a composed question ("What type of procedure is this, and have all polyps been removed?"): an
# off-target class must be asked within one part, not pieced together from words of two.
QUESTION_PART = re.compile(r"[^,;?]+?(?=,|;|\?|\band\b|$)|(?<=\band\b)[^,;?]+")
ECHO_NGRAM = 6


def cue_regex(cue: str) -> str:
    """A question cue as a regex: a whole word (plural allowed), or with a trailing `*` a word start."""
    return r"(?<![\w-])" + _cue_body(cue)


def _cue_body(cue: str) -> str:
    c = reading_form(cue)
    if c.endswith("*"):
        return re.escape(c[:-1])
    return re.escape(c) + r"(?:s|es)?(?!\w)"  # "box-like" asks about the box


def cue_group_regex(group: Sequence[str]) -> re.Pattern:
    """A group of alternative cues as one pattern (one word-start test per position: the check runs on every
    generated row)."""
    return re.compile(r"(?<![\w-])(?:" + "|".join(_cue_body(c) for c in group) + ")")


@dataclass(frozen=True)
class Violation:
    reason: str
    detail: str


# An answer that talks about its task ("The answer is 0.", "no multiple answers") or is the label string
# itself ("pink; white": the atomic answers' separator).
ANSWER_ECHO = re.compile(r"\bthe answer is\b|\bmultiple (?:answers|choices)\b|\batomic\b|\bjson\b|\bfacts?\b|"
                         r"[{}\[\]]|\bmasking\b|\bquestion\s*:")


def answer_naturalness(answer: str, min_words: int, max_words: int) -> Violation | None:
    """Is a grounded LLM answer a natural one? Judged apart from grounding: "no" states the label, and is still
    too terse for a dataset of natural answers; 60 words of filler may state it too."""
    words = len(answer.split())
    if words < min_words:
        return Violation("answer_too_terse", f"{words} word(s), the floor is {min_words}")
    if max_words and words > max_words:
        return Violation("answer_too_long", f"{words} words, at most {max_words}")
    if ";" in answer:
        return Violation("answer_copies_label", f"the label's separator ';' in {answer[:80]!r}")
    echo = ANSWER_ECHO.search(reading_form(answer))
    if echo:
        return Violation("answer_echoes_prompt", f"prompt wording {echo.group(0)!r}")
    return None


@dataclass(frozen=True)
class _Cues:
    """A class's question cues compiled once: the groups that ask it, the groups that show it asked when the
    plan lacks it, and (presence classes) its values, which ask about it too ("is there a polyp snare?")."""

    groups: tuple[re.Pattern, ...]
    off_target: tuple[re.Pattern, ...]
    values: re.Pattern | None
    prefilter: re.Pattern  # the off-target words or values, without word boundaries: most classes skip here
    named: re.Pattern | None  # every value of a named class ("pink", "colonoscopy")
    choice: re.Pattern | None  # two of them as a choice: "is the polyp pink or red?" asks the colour

    @classmethod
    def of(cls, qc: QuestionClass, reader: Reader) -> "_Cues":
        def compile_groups(groups):
            return tuple(cue_group_regex(g) for g in groups)
        values = named = choice = None
        if qc.answer_type in NAMED_VALUES:
            alternatives = "|".join(reader.value_pattern(qc.name, v).pattern for v in qc.values if v != "none")
            named = re.compile(alternatives)
            choice = re.compile(rf"(?:{alternatives})\s*,?\s+or\s+(?:(?:a|an|the)\s+)?(?:{alternatives})")
            if qc.presence and qc.answer_type == AnswerType.multi_choice:
                values = named
        off = qc.off_target_cues or qc.question_cues
        literal = [re.escape(reading_form(c).rstrip("*")) for c in off[0]]
        literal += [values.pattern] if values is not None else []
        return cls(compile_groups(qc.question_cues), compile_groups(off), values, re.compile("|".join(literal)),
                   named, choice)


class GroundingChecker:
    """The reader plus the verdict rules; one per catalog, reused for every row (compiled once).

    `prompt_texts`: the fixed text of the LLM prompts (default: `prompts/llm/`), whose long word sequences in a
    question mark a prompt echo.
    """

    def __init__(self, catalog: Catalog, prompt_texts: Sequence[str] | None = None):
        if prompt_texts is None:
            prompt_texts = [t for name in LLM_PROMPTS for p in [load_prompt(name)] for t in (p.system, p.user)]
        self.catalog = catalog
        self.reader = Reader(catalog)
        self.cues = {name: _Cues.of(qc, self.reader) for name, qc in catalog.classes.items()}
        self._prompt_texts = tuple(prompt_texts)
        atomic = [q for qc in catalog.classes.values() for q in [*qc.source_questions, qc.atomic_question]]
        # an atomic question, or its question before a form-filling tail ("Are there any abnormalities in the
        # image?" of "...? Check all that are present.")
        self.atomic = {self._bare(p) for q in atomic for p in [q, *re.split(r"(?<=\?)", q)] if p.strip()}
        # the form-filling tails of Kvasir-VQA's atomic questions ("Check all that are present."): a question
        # that carries one was copied, whatever it asks before
        self.atomic_instructions = {self._bare(p) for q in atomic for p in re.split(r"(?<=\?)", q)
                                    if p.strip() and not p.strip().endswith("?")}
        self.count_nouns = {name: re.compile(r"(?<![\w-])(?:" + "|".join(re.escape(reading_form(n)) for n in qc.noun)
                                             + r")(?:s|es)?(?![\w-])")
                            for name, qc in catalog.classes.items() if qc.answer_type == AnswerType.count}
        self.object_nouns = {name: re.compile(r"(?<![\w-])(?:" + "|".join(re.escape(reading_form(n)) for n in obj.nouns)
                                              + r")(?:s|es)?(?![\w-])") for name, obj in catalog.objects.items()}

    @cached_property
    def prompt_ngrams(self) -> frozenset[tuple[str, ...]]:
        grams = set()
        for text in self._prompt_texts:
            words = re.findall(r"[\w']+", reading_form(re.sub(r"\{[^}]*\}", " ", text)))
            grams |= {tuple(words[i:i + ECHO_NGRAM]) for i in range(len(words) - ECHO_NGRAM + 1)}
        return frozenset(grams)

    @staticmethod
    def _bare(question: str) -> str:
        return " ".join(re.findall(r"[\w'/<>-]+", reading_form(question)))

    # --- questions ------------------------------------------------------------------------------------
    def check_question(self, question: str, facts: Sequence[PlanFact], llm: bool = False) -> Violation | None:
        q = reading_form(question)
        if llm:
            bare = self._bare(question)
            copied = [p for p in re.split(r"(?<=\?)", question) if p.strip() and self._bare(p) in self.atomic]
            copied += [i for i in self.atomic_instructions if i in bare]
            if copied:
                return Violation("question_copies_atomic", f"an atomic source question verbatim: {copied[0].strip()!r}")
            echo = self._echo(question, q)
            if echo:
                return Violation("question_echoes_prompt", echo)
            if not question.strip().endswith("?"):
                return Violation("question_not_a_question", f"no question mark: {question.strip()[:80]!r}")
        explained: list[tuple[int, int]] = []
        for fact in facts:
            spans = self._asked(fact, q)
            if spans is None:
                return Violation("question_misses_class", f"question does not ask about {fact.question_class} "
                                                          f"(cues {self._cue_names(fact.question_class)})")
            explained += spans
            explained += self._object_spans(fact.question_class, q)
            if self.cues[fact.question_class].named is not None:  # "is the instrument a polyp snare?"
                explained += [m.span() for m in self.cues[fact.question_class].named.finditer(q)]
        plan = {f.question_class for f in facts}
        parts = [m.span() for m in QUESTION_PART.finditer(q)]
        choices = " or " in q
        for name, cues in self.cues.items():
            if name in plan or not (cues.prefilter.search(q) or (choices and cues.choice is not None)):
                continue
            asked = self._off_target(name, cues, q, parts, explained)
            if asked:
                return Violation("question_off_target", f"question also asks about {name} ({asked!r}), which the "
                                                        f"plan lacks")
        return None

    def _off_target(self, name: str, cues: "_Cues", q: str, parts: list[tuple[int, int]],
                    explained: list[tuple[int, int]]) -> str | None:
        """The words by which the question asks about a class outside the plan: a part of the question whose
        words for what is asked (the first cue group: "where", "how many", "colour") no plan class explains,
        the other groups matched anywhere ("What colour is the abnormality, and where is it?"); or a value of
        a presence class named unexplained ("and is there a polyp snare?")."""
        def free(m: re.Match) -> bool:
            return not any(s < m.end() and m.start() < e for s, e in explained)
        first, *rest = cues.off_target
        hit = next((m for m in first.finditer(q) if free(m)), None)
        if hit and all(g.search(q) for g in rest):
            return next(q[lo:hi].strip() for lo, hi in parts if lo <= hit.start() < hi)
        if cues.choice is not None and " or " in q:
            hit = next((m for m in cues.choice.finditer(q) if free(m)), None)
            if hit:
                return hit.group(0)
        if cues.values is not None:  # "..., and is there a polyp snare?" (not "relative to the polyp")
            for lo, hi in parts:
                hit = next((m for m in cues.values.finditer(q, lo, hi) if free(m)), None)
                if hit and PRESENCE_ASKED.search(q, lo, hi):
                    return hit.group(0)
        return None

    def _object_spans(self, name: str, q: str) -> list[tuple[int, int]]:
        """Where the question names the class's object or what that includes ("abnormal findings" for a
        finding count): words that ask about the plan, not about another class."""
        obj = self.catalog.classes[name].object
        if obj is None:
            return []
        return [m.span() for o in {obj, *self.reader.includes[obj]} for m in self.object_nouns[o].finditer(q)]

    def _cue_names(self, name: str) -> list[list[str]]:
        return self.catalog.classes[name].question_cues

    def _asked(self, fact: PlanFact, q: str) -> list[tuple[int, int]] | None:
        """The spans of the question that ask about the fact's class, or None when it is not asked."""
        qc = self.catalog.classes[fact.question_class]
        spans = []
        for group in self.cues[qc.name].groups:
            hits = [m.span() for m in group.finditer(q)]
            if not hits:
                break
            spans += hits
        else:
            return spans
        # "Is there any instrument?" asks where an absent instrument is; "any signs of colitis?" asks which
        # abnormalities there are
        absent = fact.values in (("none",), ("0",)) or (qc.object_absent and fact.values[0] in qc.object_absent)
        if qc.object and absent:
            hits = [m.span() for m in self.object_nouns[qc.object].finditer(q)]
            if hits:
                return hits
        if qc.answer_type == AnswerType.count and ANY_RE.search(q):
            # "Are there any abnormalities?" asks how many there are (Kvasir-VQA-x1 asks counts so)
            hits = [m.span() for m in self.count_nouns[qc.name].finditer(q)]
            if hits:
                return hits
        if self.cues[qc.name].values is not None:
            hits = [m.span() for m in self.cues[qc.name].values.finditer(q)]
            if hits:
                return hits
        return None

    def _echo(self, question: str, q: str) -> str | None:
        if len(question) > ECHO_MAX_CHARS:
            return f"{len(question)} characters (at most {ECHO_MAX_CHARS} for one question)"
        if "\n" in question.strip() or question.count("?") > 1:
            return "more than one question or line (the prompt asks for one question)"
        marker = ECHO_MARKERS.search(q)
        if marker:
            return f"prompt wording {marker.group(0)!r}"
        words = re.findall(r"[\w']+", q)
        for i in range(len(words) - ECHO_NGRAM + 1):
            if tuple(words[i:i + ECHO_NGRAM]) in self.prompt_ngrams:
                return f"copies the prompt: {' '.join(words[i:i + ECHO_NGRAM])!r}"
        return None

    # --- answers --------------------------------------------------------------------------------------
    def check(self, question: str, answer: str, facts: Sequence[PlanFact],
              image_facts: Sequence[PlanFact] | None = None, llm: bool = False) -> Violation | None:
        return self.check_question(question, facts, llm) or self.check_statement(answer, facts, image_facts)

    def check_statement(self, text: str, facts: Sequence[PlanFact], image_facts: Sequence[PlanFact] | None = None,
                        supported: frozenset[str] = frozenset()) -> Violation | None:
        """The answer half of `check` (also an explanation's check against the facts it cites): every plan fact
        asserted, no fact of the image contradicted, no value of a class the image has no fact of
        (`supported`: further values the text may name, e.g. the labels of the boxes shown with it)."""
        reading = self.reader.read(text)
        image = {f.question_class: f for f in (image_facts or ())}
        image.update({f.question_class: f for f in facts})
        implied = self._implied(reading, image)
        terse = reading.of("")
        plan = {f.question_class for f in facts}
        for fact in facts:
            sts = reading.of(fact.question_class) + implied.get(fact.question_class, [])
            if terse:  # "none" states every none fact of the plan, "no" every no; else the fact is missed
                sts = sts + self._terse(fact, terse[0])
            problem = self._contradiction(fact, sts, image, reading)
            if problem:
                return Violation("answer_contradicts_labels", f"{fact.question_class}={list(fact.values)}: {problem}")
            missing = self._missing(fact, sts)
            if missing:
                return Violation("answer_misses_fact", f"{fact.question_class}={list(fact.values)}: {missing}")
        for name, fact in image.items():
            if name in plan:
                continue
            problem = self._contradiction(fact, reading.of(name), image, reading)
            if problem:
                return Violation("answer_contradicts_labels", f"{name}={list(fact.values)} (a fact of the image "
                                                              f"the question does not ask): {problem}")
        invented = self._unsupported(reading, image, supported)
        if invented:
            return Violation("unsupported_value", invented)
        return None

    def _implied(self, reading: Reading, image: dict[str, PlanFact]) -> dict[str, list[Statement]]:
        """Statements that follow from another class's reading (catalog `implies`): "not all polyps have been
        removed" says a polyp is there."""
        out: dict[str, list[Statement]] = {}
        for name, qc in self.catalog.classes.items():
            if not qc.implies:
                continue
            asserted = [st for st in reading.of(name) if st.polarity == "asserted"]
            for value, implied in qc.implies.items():
                if asserted and all(st.values == {value} for st in asserted):
                    for cls, values in implied.items():
                        out.setdefault(cls, []).append(Statement(cls, frozenset(values), "asserted", asserted[0].span))
        return out

    def _terse(self, fact: PlanFact, st: Statement) -> list[Statement]:
        """A one-word answer as a statement of a plan fact: "no" for a yes/no or none fact, "2" for a count."""
        word = TERSE_WORDS.get(next(iter(st.values)), next(iter(st.values)))
        qc = self.catalog.classes[fact.question_class]
        if qc.answer_type == AnswerType.yes_no and word in qc.values:
            return [Statement(qc.name, frozenset([word]), "asserted", st.span)]
        if qc.answer_type == AnswerType.count:
            n = 0 if word in ("no", "none") else (int(word) if word.isdigit() else NUMBERS.get(word))
            if n is not None:
                return [Statement(qc.name, frozenset(), "asserted", st.span, interval=(n, n))]
        if word in ("no", "none") and "none" in qc.values:
            return [Statement(qc.name, frozenset(), "asserted", st.span, none=True)]
        return []

    def _excused(self, st: Statement, name: str, image: dict[str, PlanFact]) -> bool:
        """An unbound statement of a shared vocabulary ("red" with no noun near it) is about another candidate
        class when that class's fact on the image fits it."""
        if st.bound:
            return False
        for other in st.candidates:
            if other == name or other not in image:
                continue
            if self._fits(st, image[other]):
                return True
        return False

    def _fits(self, st: Statement, fact: PlanFact) -> bool:
        qc = self.catalog.classes[fact.question_class]
        values = set(fact.values)
        if qc.answer_type == AnswerType.location:
            return bool(st.values & values) if st.summary else st.values <= values
        return st.values <= values

    def _contradiction(self, fact: PlanFact, sts: list[Statement], image: dict[str, PlanFact],
                       reading: Reading) -> str | None:
        qc = self.catalog.classes[fact.question_class]
        values = set(fact.values)
        if qc.answer_type == AnswerType.yes_no:
            for st in sts:
                if st.polarity == "asserted" and fact.values[0] not in st.values:
                    return f"the answer states {sorted(st.values)} ({self._quote(reading, st)})"
            return None
        if qc.answer_type == AnswerType.count:
            n = int(fact.values[0])
            for st in sts:
                lo, hi = st.interval
                if st.polarity == "denied":
                    if lo == hi == n:
                        return f"the answer denies {n} ({self._quote(reading, st)})"
                elif not lo <= n <= hi:
                    said = f"{lo:g}" if lo == hi else f"{lo:g}..{hi:g}"
                    return f"the answer says {said} ({self._quote(reading, st)})"
            return None
        none = values == {"none"}
        for st in sts:
            if st.none:
                if not none and st.polarity == "asserted":
                    return f"the answer says there is none ({self._quote(reading, st)})"
                continue
            if st.interval is not None:  # the object is said to be there (presence classes)
                if none and st.polarity != "denied":
                    return f"the answer says there is one ({self._quote(reading, st)})"
                continue
            if st.polarity == "denied":
                exact = st.values & values if not st.summary else set()
                if exact:
                    return f"the answer denies {sorted(exact)} ({self._quote(reading, st)})"
                continue
            if st.polarity != "asserted" or self._excused(st, qc.name, image):
                continue
            if none:
                return f"the answer states {sorted(st.values)} ({self._quote(reading, st)})"
            if qc.answer_type == AnswerType.location and st.summary:
                if not st.values & values:
                    return f"the answer places it in {sorted(st.values)} ({self._quote(reading, st)})"
            elif st.values - values:
                return f"the answer also states {sorted(st.values - values)} ({self._quote(reading, st)})"
        return None

    def _missing(self, fact: PlanFact, sts: list[Statement]) -> str | None:
        qc = self.catalog.classes[fact.question_class]
        asserted = [st for st in sts if st.polarity == "asserted"]
        hedged = any(st.polarity == "hedged" for st in sts)
        if qc.answer_type == AnswerType.yes_no:
            if any(fact.values[0] in st.values for st in asserted):
                return None
        elif qc.answer_type == AnswerType.count:
            n = int(fact.values[0])
            if any(st.interval == (n, n) for st in asserted):
                return None
        elif fact.values == ("none",):
            if any(st.none for st in asserted):
                return None
        else:
            covered = set()  # a location summary covers its cells (one away from every cell contradicted already)
            for st in asserted:
                if st.interval is None and not st.none:
                    covered |= st.values
            lacking = sorted(set(fact.values) - covered, key=qc.sort_key)
            if not lacking:
                return None
            return (f"{lacking} only hedged" if hedged else f"{lacking} not stated")
        return "only hedged" if hedged else "not stated"

    def _unsupported(self, reading: Reading, image: dict[str, PlanFact], supported: frozenset[str]) -> str | None:
        """A value asserted for a named class the image has no fact of: an invented finding. A value that is also
        an object noun is supported by any fact about that object ("a polyp" beside a polyp count)."""
        about = {self.catalog.classes[n].object for n in image} - {None}
        implied = self._implied_by_rules(image)
        for name, sts in reading.statements.items():
            qc = self.catalog.classes.get(name)
            if qc is None or name in image or not qc.check_unsupported:
                continue
            if qc.answer_type == AnswerType.yes_no and qc.object is None:
                # "the image contains on-screen text" with no text fact on the image
                # (words another class of the image reads too, e.g. a class sharing the cue, are that class's)
                shared = {st.span for other in image for st in reading.of(other)}
                st = next((st for st in sts if st.polarity == "asserted" and st.values == {"yes"}
                           and "yes" not in implied.get(name, set()) and st.span not in shared), None)
                if st is not None:
                    return f"{name}: the answer states 'yes' ({self._quote(reading, st)}) and no fact of the image " \
                           f"says so"
                continue
            if qc.answer_type not in NAMED_VALUES:
                continue
            for st in sts:
                if st.polarity != "asserted" or st.none or st.interval is not None or not st.values:
                    continue
                if st.values <= supported | implied.get(name, set()) or self._excused(st, name, image):
                    continue
                if not st.bound and any(c in image for c in st.candidates):
                    continue
                if self.reader.object_of_span(reading.text, st.span) in about:
                    continue
                return f"{name}: the answer states {sorted(st.values)} ({self._quote(reading, st)}) and no fact of " \
                       f"the image has it"
        return None

    def _implied_by_rules(self, image: dict[str, PlanFact]) -> dict[str, set[str]]:
        """Values the image's facts imply through the catalog's conflict rules: a rule "abnormality_presence
        lacks ulcerative colitis conflicts with a colitis grade" says a grade implies the colitis, so an answer
        naming it beside a grade fact invents nothing."""
        out: dict[str, set[str]] = {}
        for rule in self.catalog.conflicts.values():
            when = self.catalog.classes[rule.when.question_class]
            if rule.when.none_of is not None:
                implied = set(rule.when.none_of)
            elif rule.when.any_of is not None and when.answer_type == AnswerType.yes_no:
                implied = set(when.values) - set(rule.when.any_of)  # "finding_presence is no" conflicts: yes
            else:
                continue
            for cond in rule.conflicts_with:
                fact = image.get(cond.question_class)
                if fact is not None and cond.holds(fact.values):
                    out.setdefault(when.name, set()).update(implied)
        return out

    @staticmethod
    def _quote(reading: Reading, st: Statement) -> str:
        s, e = st.span
        return repr(reading.text[max(0, s - 20):e + 20].strip())
