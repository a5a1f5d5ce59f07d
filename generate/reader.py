"""What a text says about each question class: the values it asserts, denies or only hedges. No LLM.

The grounding check (`generate.grounding`) judges LLM-written answers, paraphrases and explanations; a
matcher that looks for a fact's value somewhere in the text accepts "The abnormality is not red." for red
and "One or two polyps are visible." for one polyp, and rejects "evidence of esophageal inflammation" for
oesophagitis. The reader instead reads each mention where it stands:

- **Mentions.** Every surface form of every catalog value (longest first: "polyp snare" is an instrument,
  not a polyp), region lists on the 3x3 grid ("in the central and lower-right regions"), counts ("a single
  tubular device", "the number of polyps is 2", "no polyps"), yes/no cues ("text", "remain") and the nouns of
  the things classes describe (`objects` in the catalog: "no instruments" says an instrument location is
  none and an instrument count is zero).
- **Polarity, scoped.** A negation covers what follows it in its clause up to a scope break ("with", "but",
  "other than"...): "red and pink with no ulceration" asserts pink. "<mention> is not visible" denies it.
  "other than X" asserts X whatever came before ("no landmark other than the Z-line").
- **Hedges.** "or" between two values, modal words ("possibly", "may", "whether") and quantifiers ("more
  than", "at least", "several", "a second") make a statement that is not an exact value. Counts are read as
  intervals ("more than one" is [2, inf), "one or two" [1, 2], "several" [2, inf)).
- **Binding.** A value whose vocabulary several classes share (colours, grid cells, relative sizes) belongs
  to the class whose object is named nearest to it (same clause first, then sentence, then text): "the
  abnormality is pink and the landmark is red" states abnormality pink, landmark red.
- **Topics.** A noun followed by another class's topic word belongs to that class: "no polyp *size*
  applies" is no count of zero, "all polyps have been *removed*" is no statement that a polyp is present.

`read(text)` returns a `Reading`: per class, the statements found; `generate.grounding` turns them into
verdicts against the facts of an image. All rules are compiled once per catalog (the check runs on every
generated row: `benchmarks/grounding.py` times it).
"""

from __future__ import annotations

import bisect
import math
import re
import threading
from dataclasses import dataclass, field

from generate.template import NUMBER_WORDS
from kvqa.catalog import AnswerType, Catalog
from kvqa.text import normalise_text

NAMED_VALUES = {AnswerType.single_choice, AnswerType.multi_choice, AnswerType.color, AnswerType.location}

# --- the language rules (English; the vocabulary is catalog data) -------------------------------------
NEGATION = (r"\bno\b|\bnot\b|\bnone\b|\bwithout\b|\babsent\b|\bneither\b|\bnor\b|\bnever\b|\bfree of\b|"
            r"\black of\b|\black(?:s|ing)?\b|\bnegative for\b|n't\b|\bnothing\b|\bzero\b|\babsence of\b|"
            r"\bdevoid of\b|\brather than\b|\binstead of\b")
NEGATION_RE = re.compile(NEGATION)
# Words after which a negation no longer covers what follows, and clause boundaries.
SCOPE_BREAK_RE = re.compile(r"\b(?:but|however|although|though|whereas|while|with|which|where|whose|"
                            r"that|also)\b")
# A determiner's negation ("no polyps") covers its noun phrase only: "no residual polyps identified *during*
# colonoscopy" does not deny the colonoscopy ("not captured during a gastroscopy" does), nor "no Paris type
# *is given for* the lesion" the lesion ("no region of the frame holds an instrument" denies the instrument).
DETERMINER_NEGATION_RE = re.compile(r"\b(?:no|none|without|free of|lack of|zero|absence of|devoid of)\b")
PRESUPPOSED_RE = re.compile(r"\b(?:is|are|was|were|been)\s+(?:\w+\s+)?(?:for|about|regarding)\b")
PREPOSITION_BREAK_RE = re.compile(r"(?<![\w-])(?:during|via|after|following|throughout|using)(?![\w-])")
EXCEPTION_RE = re.compile(r"\b(?:other than|except(?: for)?|besides|apart from|aside from|beyond|only|save for)\s+"
                          r"(?:(?:the|a|an|one|its)\s+)?$")
LIST_GAP_RE = re.compile(r"\s*,\s*(?:(?:and|or|nor)\s+)?|\s+(?:and|or|nor|as well as|&)\s+|\s*/\s*")
# "Apart from the tube, no instrument is visible": the denial that follows leaves the exception out.
EXCEPTION_LEAD_RE = re.compile(r"^\s*(?:apart from|aside from|besides|except for|other than|save for)\b")
# A sentence that says it is unsure hedges all it says: "consistent with haemorrhoids, but this is not certain".
SENTENCE_HEDGE_RE = re.compile(r"\b(?:not certain|uncertain|cannot be (?:excluded|ruled out)|not sure|unsure|"
                               r"not definite|not confirmed)\b")
EXCEPTION_AFTER_RE = re.compile(r"\s*(?:(?:is|are|was|were)\s+)?(?:visible\s+|present\s+|seen\s+|remains?\s+)?"
                                r"(?:other than|except|besides|apart from|aside from|save for)\b")
CLAUSE_RE = re.compile(r"[,;:.!?()]|\band\b|\bbut\b|\bwhile\b|\bwhereas\b|\bwith\b|\balthough\b|\bhowever\b")
SENTENCE_RE = re.compile(r"[.;!?]\s")
LINKING = (r"(?:is|are|was|were|be|been|being|has|have|had|do|does|did|can|could|appear|appears|seem|seems|"
           r"currently|clearly|also|any|visibly|yet|still|to|of|in|the|image|frame|this|there|here)")
# "<mention> is not visible", "polyps are absent": a negation after the mention, about its presence only
# ("the abnormality is not red" denies red, not the abnormality).
PRESENT = (r"(?:visible|present|seen|identified|observed|detected|noted|found|evident|shown|apparent|visualized|"
           r"depicted|appreciated|in view|there|recorded|given|applicable)")
POST_NEGATION_RE = re.compile(rf"\s*:?\s*(?:{LINKING}\s+){{0,4}}(?:(?:not|n't)\s+(?:(?:clearly|currently|readily|"
                              rf"directly|definitely|really)\s+)?{PRESENT}\b|(?:not|n't)\s*(?:[,;.]|$)|absent\b|"
                              r"none\b|missing\b|lacking\b|excluded\b|ruled out\b|nowhere\b)")
# Words of a list continuation: "no instruments, polyps, or landmarks" negates all three.
VERB_RE = re.compile(r"\b(?:is|are|was|were|be|been|has|have|had|shows?|showed|shown|appears?|seen|visible|present|"
                     r"identified|observed|detected|noted|found|remains?|measures?|lies|located|depicts?|contains?|applies|apply|"
                     r"given|recorded|extends?|covers?|spans?|occupies|fills?|sits?|lie|occup(?:y|ies)|affects?)\b")
# A statement that does not assert: modal and epistemic words before the mention in its clause.
MODAL_RE = re.compile(r"\b(?:possibl[ey]|probabl[ey]|perhaps|maybe|may|might|could|likely|unlikely|"
                      r"suspect(?:ed)?|suspicio(?:n|us)|suggest(?:s|ive|ing)?|question(?:able)?|uncertain|"
                      r"unclear|whether|if any|cannot|can't|unable|difficult|not possible|not clear|"
                      r"indeterminate|potential(?:ly)?|presum(?:ed|ably)|seemingly|apparent(?:ly)?)\b")
# Count quantifiers: (pattern before the number or noun, interval it states). `k` is the number.
BOUND_BEFORE = [(re.compile(r"\b(?:more than|over|greater than|above|in excess of)\s*$"), "gt"),
                (re.compile(r"\b(?:at least|a minimum of|no fewer than|no less than)\s*$"), "ge"),
                (re.compile(r"\b(?:less than|fewer than|under|below)\s*$"), "lt"),
                (re.compile(r"\b(?:at most|up to|no more than|a maximum of)\s*$"), "le"),
                (re.compile(r"\b(?:about|approximately|around|roughly|nearly|almost|some|circa|~)\s*$"), "about")]
OR_MORE_RE = re.compile(r"\s*(?:\+|or more|or fewer|or less|or so)\b")
# Quantifier words standing for a number: the interval each states.
QUANTIFIERS = {"several": (2, math.inf), "multiple": (2, math.inf), "many": (2, math.inf),
               "numerous": (2, math.inf), "a few": (2, math.inf),
               "a couple of": (2, math.inf), "various": (2, math.inf), "some": (1, math.inf),
               "another": (2, math.inf), "a second": (2, math.inf), "second": (2, math.inf),
               "a third": (3, math.inf), "third": (3, math.inf), "additional": (2, math.inf),
               "other": (2, math.inf), "more": (2, math.inf), "further": (2, math.inf), "both": (2, 2)}
NUMBERS = {w: i for i, w in enumerate(NUMBER_WORDS)} | {"a single": 1, "single": 1, "only one": 1,
                                                          "a solitary": 1, "solitary": 1,
                                                          "a lone": 1, "one single": 1, "no": 0, "a pair of": 2}
REGION_NOUNS = (r"(?:half|halves|part|parts|portion|portions|region|regions|area|areas|side|sides|section|"
                r"sections|quadrant|quadrants|aspect|aspects|zone|zones|third|thirds|field|fields|corner|"
                r"corners|segment|segments|location|locations|position|positions|cell|cells)")
WHOLE_FRAME_RE = re.compile(r"\b(?:whole|entire|all (?:nine |9 )?(?:regions|areas|parts|cells|quadrants|sections)|"
                            r"throughout|every (?:region|area|part|cell)|everywhere|across all|all over|"
                            r"all parts|full (?:frame|image|field))\b")
# Direction words of a region summary: "the upper half", "central and lower regions".
DIRECTIONS = {"upper": "row0", "top": "row0", "superior": "row0", "lower": "row2", "bottom": "row2",
              "inferior": "row2", "left": "col0", "right": "col2", "central": "mid", "center": "mid",
              "middle": "mid", "centrally": "mid"}


BOX_NAME_RE = re.compile(r"(?:green\s*(?:/|or|and)\s*black|black\s*(?:/|or|and)\s*green)"
                         r"(?=\s+(?:box|corner|artifact|overlay|square|marker))")
MILLIMETERS_RE = re.compile(r"(\d)\s*(?:mm|millimeters?)\b")


def reading_form(text: str) -> str:
    """The text as the reader reads it: `kvqa.text.normalise_text` (lower case, ASCII quotes and dashes,
    American spelling, spaces collapsed), then the reader's own rewrites: dashes joined ("5 - 10" -> "5-10"),
    the box artefact's name fused ("green and black box" -> "green-black box"), sizes' units fused
    ("5 - 10 millimeters" -> "5-10mm").

    The rewrites are not normalisation (not what makes two texts equal: dedup and the catalog compare
    `normalise_text` without them) but decisions about how to read a text for its facts. Joined dashes and
    fused units let one pattern read a range or a size however it is spaced; the box's name holds two
    colours that say nothing about the abnormality's colour, so it becomes one word that names no colour
    (only the box's name: "green and black abnormal tissue" keeps both colours)."""
    t = re.sub(r"\s*-\s*", "-", normalise_text(text))
    t = BOX_NAME_RE.sub("green-black", t)
    t = MILLIMETERS_RE.sub(r"\1mm", t)
    return " ".join(t.split())


@dataclass(frozen=True)
class Statement:
    """One thing a text says about one class.

    `values`: the values it names (grid cells for locations, a yes/no class's possible values). `polarity`:
    "asserted", "denied" or "hedged". `interval` (counts only): the numbers it allows. `summary`: the values
    are a region summary ("the central region"): it covers them and must touch the fact's cells, but does
    not claim every one. `none`: the class's object is said to be absent (no value, "none" for the class).
    `bound`: the class was chosen by an anchor or is the only one; unbound statements of shared vocabularies
    count for each candidate class.
    """

    question_class: str
    values: frozenset[str]
    polarity: str
    span: tuple[int, int]
    interval: tuple[float, float] | None = None
    summary: bool = False
    none: bool = False
    bound: bool = True
    candidates: tuple[str, ...] = ()


@dataclass
class Reading:
    text: str
    statements: dict[str, list[Statement]] = field(default_factory=dict)

    def of(self, question_class: str) -> list[Statement]:
        return self.statements.get(question_class, [])

    def add(self, st: Statement) -> None:
        self.statements.setdefault(st.question_class, []).append(st)


@dataclass(frozen=True)
class _Form:
    """A surface form: the (class, value) pairs it can mean and whether it is also an object noun."""

    meanings: tuple[tuple[str, str], ...]
    obj: str | None


FOREIGN = "<foreign>"  # `Reader._bind`: the mention describes a thing no candidate class is about


class Reader:
    """The catalog's vocabulary compiled into one reader; `read` is pure and thread-safe."""

    def __init__(self, catalog: Catalog):
        self.catalog = catalog
        self.classes = catalog.classes
        self.objects = {name: tuple(reading_form(n) for n in obj.nouns) for name, obj in catalog.objects.items()}
        self.class_object = {n: qc.object for n, qc in self.classes.items() if qc.object}
        self._value_patterns: dict[tuple[str, str], re.Pattern] = {}
        self._foreign: dict[tuple[str, ...], re.Pattern | None] = {}
        self._local = threading.local()  # the clause and sentence bounds of the text being read, per thread
        self.includes = {name: self._included(name) for name in catalog.objects}
        grid = [v for v in catalog.location_grid if v != "none"]
        self.grid = frozenset(grid)
        self._compile_forms()
        self._compile_counts()
        self._compile_things()
        self._compile_anchors()
        self._compile_topics()
        self._compile_regions()
        self.polarity = {n: [(re.compile(c.pattern), c.affirmative) for c in qc.polarity_cues]
                         for n, qc in self.classes.items() if qc.answer_type == AnswerType.yes_no}
        self.phrases = {n: [(v, re.compile("|".join(p))) for v, p in qc.value_phrases.items()]
                        for n, qc in self.classes.items() if qc.value_phrases}
        self.cells = {"row0": {c for c in grid if c.startswith("upper")},
                      "row2": {c for c in grid if c.startswith("lower")},
                      "col0": {c for c in grid if c.endswith("left")},
                      "col2": {c for c in grid if c.endswith("right")},
                      "mid": {c for c in grid if c == "center" or c.startswith("center") or c.endswith("center")}}

    # --- compilation ----------------------------------------------------------------------------------
    def _included(self, name: str) -> set[str]:
        """The objects `name` includes, transitively (a polyp is an abnormality, so "a polyp" says one is there)."""
        out, todo = set(), list(self.catalog.objects[name].includes)
        while todo:
            o = todo.pop()
            if o not in out:
                out.add(o)
                todo += self.catalog.objects[o].includes
        return out

    def _compile_forms(self) -> None:
        forms: dict[str, list[tuple[str, str]]] = {}
        for name, qc in self.classes.items():
            if qc.answer_type not in NAMED_VALUES:
                continue
            for value, spec in qc.values.items():
                if value == "none":
                    continue
                written = [value, *([spec.display] if spec.display else []), *spec.synonyms]
                for w in written:
                    f = reading_form(w)
                    variant = re.sub(r"^(?:a|an|the) ", "", f)  # "a polyp": the article is no part of the value
                    forms.setdefault(variant, [])
                    if (name, value) not in forms[variant]:
                        forms[variant].append((name, value))
        noun_object = {n: o for o, nouns in self.objects.items() for n in nouns}

        def obj_of(f: str) -> str | None:  # "polyps" names the polyp as "polyp" does
            return noun_object.get(f) or noun_object.get(re.sub(r"(?:es|s)$", "", f)) or noun_object.get(f[:-1])

        self.forms = {f: _Form(tuple(m), obj_of(f)) for f, m in forms.items()}
        alternatives = sorted(self.forms, key=len, reverse=True)
        self.form_re = re.compile(r"(?<![\w-])(" + "|".join(re.escape(f) for f in alternatives) + r")(?:s|es)?(?![\w-])")
        nouns = sorted({n for ns in self.objects.values() for n in ns} - set(self.forms), key=len, reverse=True)
        self.noun_object = noun_object
        self.noun_re = re.compile(r"(?<![\w-])(" + "|".join(re.escape(n) for n in nouns) + r")(?:s|es)?(?![\w-])")

    def _compile_things(self) -> None:
        """Words that name things (object nouns, presence values, yes/no cues such as "text"): what a list
        after one negation may hold."""
        words = [re.escape(f) for f, form in self.forms.items() if self._is_noun(form)]
        words += [re.escape(n) for ns in self.objects.values() for n in ns]
        patterns = [c.pattern for qc in self.classes.values() for c in qc.polarity_cues]
        self.thing_re = re.compile(r"(?<![\w-])(?:" + "|".join(sorted(words, key=len, reverse=True)) + r")|"
                                   + "|".join(f"(?:{p})" for p in patterns))

    def _compile_counts(self) -> None:
        self.count_classes = [n for n, qc in self.classes.items() if qc.answer_type == AnswerType.count]
        self.count_nouns: dict[str, str] = {}
        for n in self.count_classes:
            for noun in self.classes[n].noun or []:
                self.count_nouns[reading_form(noun)] = n
        nouns = "|".join(re.escape(n) for n in sorted(self.count_nouns, key=len, reverse=True))
        numbers = "|".join(re.escape(w) for w in sorted(NUMBERS, key=len, reverse=True))
        quants = "|".join(re.escape(w) for w in sorted(QUANTIFIERS, key=len, reverse=True))
        item = rf"(?:\d+|{numbers})"
        # "<number>[ or <number>] [up to two words] <noun>"
        self.count_re = re.compile(rf"(?<![\w-])({item}(?:\s*(?:or|to|-)\s*{item})?|{quants})(?![\w-])\s+"
                                   rf"((?:(?!(?:and|or|but|with|no|not|\d+|{numbers}|{quants})(?![\w-]))[\w'-]+,?\s+){{0,2}}?)({nouns})"
                                   rf"(?:s|es)?(?![\w-])")
        # "a single polyp *snare*": the first noun was a modifier of the second
        self.count_compound_re = re.compile(rf"\s+({nouns})(?:s|es)?(?![\w-])")
        # "the number of <noun> [is|:|=] <number>", "<noun> count: <number>", "<noun>s: <number>"
        self.count_after_re = re.compile(rf"(?:number|count|total)\s+of\s+(?:[\w'-]+\s+){{0,2}}?({nouns})(?:s|es)?"
                                         rf"\b[^,;.]{{0,40}}?\b(?:is|are|was|were|equals|:|=|totals?)\s*"
                                         rf"(?:only\s+|exactly\s+|just\s+)?(\d+|{numbers})(?![\w-])|"
                                         rf"({nouns})(?:s|es)?\s*(?:count\s*)?(?::|=)\s*(\d+|{numbers})(?![\w-])")

    def _compile_anchors(self) -> None:
        """Per class with a shared vocabulary, the nouns that bind a mention to it (its object's nouns); per
        object, the words that name it (its nouns and its presence class's values: "snare" is an instrument)."""
        self.anchor_re: dict[str, re.Pattern] = {}
        self.object_anchor_re: dict[str, re.Pattern] = {}
        # objects some named-value class describes (a colour, a place, a size): only those can be "another thing"
        self.described = {qc.object for qc in self.classes.values() if qc.object and qc.answer_type in NAMED_VALUES}
        for obj, nouns in self.objects.items():
            words = set(nouns)
            for other in self.classes.values():
                if other.object == obj and other.answer_type == AnswerType.multi_choice and other.presence:
                    words |= {reading_form(f) for v, sp in other.values.items() if v != "none"
                              for f in [v, *sp.synonyms, *([sp.display] if sp.display else [])]}
            self.object_anchor_re[obj] = re.compile(r"(?<![\w-])(?:" + "|".join(
                re.escape(re.sub(r"^(?:a|an|the) ", "", w)) for w in sorted(words, key=len, reverse=True)) + r")(?:s|es)?(?![\w-])")
        for name, qc in self.classes.items():
            obj = qc.object
            if not obj:
                continue
            nouns = set(self.objects[obj])
            for inc in self.includes[obj]:
                nouns |= set(self.objects[inc])
            # the values of presence classes about the same object name it too ("the z-line is pink")
            for other in self.classes.values():
                if other.object == obj and other.answer_type == AnswerType.multi_choice and other.presence:
                    nouns |= {reading_form(f) for v, s in other.values.items() if v != "none"
                              for f in [v, *s.synonyms, *([s.display] if s.display else [])]}
            self.anchor_re[name] = re.compile(r"(?<![\w-])(?:" + "|".join(re.escape(n) for n in sorted(nouns, key=len, reverse=True))
                                              + r")(?:s|es)?(?![\w-])")

    def _compile_topics(self) -> None:
        """Topic words: a noun followed by one (linking words between) belongs to the topic's class."""
        # a compound ("polyp size") or a verb phrase ("polyps have been removed", "no polyps to remove"); not a
        # modifier ("no polyps of any size" denies polyps)
        between = (r"\s*(?:(?:is|are|was|were|be|been|being|has|have|had|to|not|yet|still|now|fully|completely|all|"
                   r"successfully|already|currently)\s+){0,4}")
        self.topics = [(n, re.compile(between + r"\b(?:" + "|".join(re.escape(reading_form(w)) for w in qc.topic_words) + ")"))
                       for n, qc in self.classes.items() if qc.topic_words]
        self.topics_before = {n: re.compile(r"\b(?:" + "|".join(re.escape(reading_form(w)) for w in qc.topic_words)
                                            + r")\w*\s+(?:[\w-]+\s+)?$") for n, qc in self.classes.items() if qc.topic_words}
        by_word: dict[str, list[str]] = {}
        for n, qc in self.classes.items():
            # a location word alone says nothing of a class ("no region is marked" is about the boxes shown)
            if "none" in qc.values and qc.answer_type != AnswerType.location:
                for w in qc.topic_words:
                    by_word.setdefault(reading_form(w), []).append(n)
        self.topic_words = [(re.compile(r"(?<![\w-])" + re.escape(w)), classes) for w, classes in by_word.items()]

    def _compile_regions(self) -> None:
        """Region lists: grid cells and direction words joined by commas / "and" / "or", before a region noun."""
        cell_forms = sorted((f for f, form in self.forms.items() if any(v in self.grid for _, v in form.meanings)),
                            key=len, reverse=True)
        dirs = "|".join(sorted(DIRECTIONS, key=len, reverse=True))
        item = r"(?:" + "|".join(re.escape(f) for f in cell_forms) + rf"|(?:{dirs})(?:[\s-](?:{dirs}))?)(?![\w])"
        sep = r"(?:\s*,\s*(?:and\s+|or\s+)?|\s+and\s+|\s+or\s+|\s*/\s*|\s+as well as\s+)"
        self.region_item_re = re.compile(item)
        self.region_list_re = re.compile(rf"(?<![\w-])(?:(?:in|at|on|toward|towards|within|across)\s+)?((?:the\s+)?{item}(?:{sep}(?:the\s+)?{item})*)"
                                         rf"(?:\s+of the (?:image|frame|field))?\s+{REGION_NOUNS}\b"
                                         rf"|(?<![\w-])(?:in|at|on|toward|towards)\s+the\s+({item})"
                                         rf"(?:\s+of the (?:image|frame|field|view))?(?![\w-])")

    def value_pattern(self, name: str, value: str) -> re.Pattern:
        """Every surface form of one value of one class, as one pattern (questions naming a value)."""
        key = (name, value)
        if key not in self._value_patterns:
            forms = sorted((f for f, form in self.forms.items() if key in form.meanings), key=len, reverse=True)
            self._value_patterns[key] = re.compile(r"(?<![\w-])(?:" + "|".join(re.escape(f) for f in forms)
                                                   + r")(?:s|es)?(?![\w-])" if forms else r"(?!x)x")
        return self._value_patterns[key]

    def object_of_span(self, a: str, span: tuple[int, int]) -> str | None:
        """The object a mention's words name ("polyps" -> polyp), if they are an object noun."""
        word = a[span[0]:span[1]]
        form = self.forms.get(word) or self.forms.get(re.sub(r"(?:es|s)$", "", word))
        if form and form.obj:
            return form.obj
        return self.noun_object.get(word) or self.noun_object.get(re.sub(r"(?:es|s)$", "", word))

    # --- reading ----------------------------------------------------------------------------------------
    def read(self, text: str) -> Reading:
        a = reading_form(text)
        reading = Reading(a)
        self._local.bounds = [m.start() for m in CLAUSE_RE.finditer(a)]
        self._local.sentences = [m.start() for m in SENTENCE_RE.finditer(a)]
        taken: list[tuple[int, int]] = []
        self._read_counts(a, reading)
        self._read_phrases(a, reading, taken)
        self._read_regions(a, reading, taken)
        self._read_forms(a, reading, taken)
        self._read_nouns(a, reading, taken)
        self._read_topics(a, reading)
        self._read_polarity(a, reading, taken)
        self._read_terse(a, reading)
        return reading

    def _clause(self, a: str, s: int, e: int) -> tuple[int, int]:
        i = bisect.bisect_right(self._local.bounds, s)
        start = self._local.bounds[i - 1] if i else 0
        j = bisect.bisect_left(self._local.bounds, e)
        end = self._local.bounds[j] if j < len(self._local.bounds) else len(a)
        return start, end

    def _sentence(self, a: str, s: int) -> tuple[int, int]:
        i = bisect.bisect_right(self._local.sentences, s)
        start = self._local.sentences[i - 1] if i else 0
        end = self._local.sentences[i] if i < len(self._local.sentences) else len(a)
        return start, end

    def _list_start(self, a: str, cs: int, s: int, e: int, ce: int) -> int:
        """Where the list holding the mention starts. "No instruments, polyps, or landmarks are identified"
        denies all three: back over earlier short comma-separated clauses without a verb that name things,
        while the mention's own clause holds only list glue before it and the list goes on to an "or"/"nor"
        item ("no box artefact, the Z-line is visible" and "no box artefact, findings consistent with
        oesophagitis" assert the Z-line and the findings)."""
        glue = a[cs:s]
        tail = re.match(r"((?:\s+[\w-]+){0,2}?)\s*(?:[.;!?]|$)", a[e:])  # "... and of any box [artefact]."
        if re.fullmatch(r"and\s+(?:of\s+)?(?:(?:the|a|an|any)\s+)?", glue) and tail and not VERB_RE.search(tail.group(1)):
            # "free of instruments and of any box artefact", "free of both instruments and text"
            i = bisect.bisect_left(self._local.bounds, cs)
            prev = self._local.bounds[i - 1] if i > 0 else 0
            seg = a[prev:cs]
            neg = list(NEGATION_RE.finditer(seg))
            # only a list the negation announces: "of any X", "both X and Y" ("no text and retroflex view"
            # asserts the view)
            announced = " of " in f" {glue}" or (neg and re.search(r"\b(?:both|either)\b", seg[neg[-1].end():]))
            if neg and announced and not VERB_RE.search(seg, neg[-1].end()) and len(seg[neg[-1].start():].split()) <= 6:
                return prev
            return cs
        if cs == 0 or a[cs] != "," or re.sub(r"[,;:]|\b(?:or|and|nor|the|a|an|any)\b", " ", glue).strip():
            return cs
        # a list names its last item with "or"/"nor": this item is that one, or one before it
        if not (re.search(r"\b(?:or|nor)\b", glue) or re.match(r"\s*,?\s*(?:or|nor)\b", a[e:])):
            return cs
        i = bisect.bisect_left(self._local.bounds, cs)
        while True:
            prev = self._local.bounds[i - 1] if i > 0 else 0
            seg = a[prev:cs]
            if VERB_RE.search(seg) or len(seg.split()) > 5 or not self.thing_re.search(seg):
                return cs
            cs, i = prev, i - 1
            if i < 0 or NEGATION_RE.search(seg) or a[prev] != ",":
                return cs

    def polarity_at(self, a: str, s: int, e: int, listable: bool = False) -> str:
        """asserted / denied / hedged for the mention a[s:e], from the words around it in its clause (and, for
        a noun that can stand in a list, the list it stands in)."""
        cs, ce = self._clause(a, s, e)
        if listable:
            cs = self._list_start(a, cs, s, e, ce)
        # the clause start for negation scope: a "no" before "and"/"with" does not reach here
        before = a[cs:s]
        if EXCEPTION_RE.search(before) or EXCEPTION_AFTER_RE.match(a, e):
            # "no landmark other than the Z-line": the Z-line is there, and so is a landmark
            return "asserted"
        negated = False
        last = None
        for m in NEGATION_RE.finditer(before):
            last = m
        scope = before[last.end():] if last is not None else ""
        if last is not None and not SCOPE_BREAK_RE.search(scope) and not (
                DETERMINER_NEGATION_RE.fullmatch(last.group(0))
                and (PREPOSITION_BREAK_RE.search(scope) or PRESUPPOSED_RE.search(scope))):
            if re.match(r"\s*(?:other|further|additional|more|another)\b", before[last.end():]):
                return "hedged"  # "no other landmark is present" denies only the others
            negated = True
        if not negated and POST_NEGATION_RE.match(a, e):
            negated = True
        if MODAL_RE.search(before) or MODAL_RE.search(a[e:ce]):
            return "hedged"
        ss, se = self._sentence(a, s)
        if SENTENCE_HEDGE_RE.search(a, ss, se):
            return "hedged"
        if negated and EXCEPTION_LEAD_RE.match(a[ss:se]):
            return "hedged"  # "apart from the tube, no instrument": only the others are denied
        return "denied" if negated else "asserted"

    def _free(self, taken: list[tuple[int, int]], s: int, e: int) -> bool:
        return not any(ts < e and s < te for ts, te in taken)

    def _read_phrases(self, a: str, reading: Reading, taken: list) -> None:
        for name, phrases in self.phrases.items():
            for value, pattern in phrases:
                for m in pattern.finditer(a):
                    reading.add(Statement(name, frozenset([value]), "asserted", m.span()))
                    taken.append(m.span())

    def _read_regions(self, a: str, reading: Reading, taken: list) -> None:
        """Region lists ("the central and lower-right regions") and whole-frame phrases: grid statements for
        the location class their nearest anchor names."""
        loc_classes = [n for n, qc in self.classes.items() if qc.answer_type == AnswerType.location]
        for m in WHOLE_FRAME_RE.finditer(a):
            self._add_bound(a, reading, loc_classes, self.grid, m.span(), summary=False)
            taken.append(m.span())
        for m in self.region_list_re.finditer(a):
            group = 1 if m.group(1) is not None else 2
            items, spans = [], []
            for it in self.region_item_re.finditer(m.group(group)):
                word = it.group(0)
                s = m.start(group) + it.start()
                spans.append((s, s + len(word)))
                items.append(self._region_cells(word, in_list=group == 1))
            if not items:
                continue
            polarity = self.polarity_at(a, spans[0][0], spans[0][1])
            hedged = len(items) > 1 and self._or_list(m.group(group))
            chosen = self._bind(a, loc_classes, m.span())  # one subject for the whole list
            for (cells, summary), span in zip(items, spans):
                if cells:
                    self._add_bound(a, reading, loc_classes, cells, span, summary=summary, polarity=polarity,
                                    hedged_or=hedged, chosen=chosen)
            taken.append(m.span())

    def _region_cells(self, word: str, in_list: bool) -> tuple[frozenset[str], bool]:
        """The grid cells a region word names, and whether it is a summary. In a region list a bare direction
        ("central", "upper") is a summary of its row, column or the middle cross; a compound ("lower
        central", "upper-left") or "in the center" is the cell itself."""
        parts = [p for p in re.split(r"[\s-]+", word) if p]
        if in_list and len(parts) == 1 and parts[0] in DIRECTIONS:
            return frozenset(self.cells[DIRECTIONS[parts[0]]]), True
        form = self.forms.get(word)
        cells = {v for _, v in form.meanings if v in self.grid} if form else set()
        if cells:
            return frozenset(cells), False
        got = [self.cells[DIRECTIONS[p]] for p in parts if p in DIRECTIONS]
        if not got:
            return frozenset(), False
        both = set.intersection(*got)
        if len(both) == 1 or len(got) == 1:
            return frozenset(both), len(both) > 1
        return frozenset(set.union(*got)), True

    @staticmethod
    def _or_list(text: str) -> bool:
        return bool(re.search(r"\bor\b|/", text))

    def _add_bound(self, a: str, reading: Reading, candidates: list[str], values, span, summary: bool,
                   polarity: str | None = None, hedged_or: bool = False, chosen: list[str] | None = None,
                   listable: bool = False) -> None:
        if chosen is None:
            chosen = self._bind(a, candidates, span)
        if chosen == [FOREIGN]:
            return  # about a thing none of the candidate classes describes
        pol = polarity or self.polarity_at(a, *span, listable=listable)
        if hedged_or and pol == "asserted":
            pol = "hedged"
        for c in (chosen or candidates):
            reading.add(Statement(c, frozenset(values), pol, span, summary=summary,
                                  bound=bool(chosen) or len(candidates) == 1, candidates=tuple(candidates)))

    def _foreign_re(self, candidates: tuple[str, ...]) -> re.Pattern | None:
        """The words naming things a named-value class describes but none of `candidates` is about (for colours:
        instruments); cached per candidate set."""
        if candidates not in self._foreign:
            own = {self.classes[c].object for c in candidates} - {None}
            own |= {o for x in own for o in self.includes[x]}
            own |= {o for o in self.includes if self.includes[o] & own}  # a polyp is an abnormality
            pats = [self.object_anchor_re[o].pattern for o in sorted(self.described - own)]
            self._foreign[candidates] = re.compile("|".join(pats)) if pats else None
        return self._foreign[candidates]

    def _bind(self, a: str, candidates: list[str], span: tuple[int, int], clause_only: bool = False) -> list[str]:
        """The candidate class whose object is named nearest to the mention: in its clause (either side), then
        before it in its sentence (the subject: "the landmark appears in the upper-centre and centre areas, no
        polyps identified"), then after it, then before and after in the whole text; none when no candidate's
        object is named or two are equally near."""
        if len(candidates) == 1:
            return list(candidates)
        s, e = span
        cs, ce = self._clause(a, s, e)
        ss, se = self._sentence(a, s)
        ranges = [(cs, ce)] if clause_only else [(cs, ce), (ss, s), (e, se), (0, s), (e, len(a))]
        for k, (lo, hi) in enumerate(ranges):
            best, best_d = [], None
            if k == 0:  # "the snare is red": a colour of a thing no candidate class describes
                foreign = self._foreign_re(tuple(candidates))
                if foreign is not None:
                    own = [o.span() for c in candidates if c in self.anchor_re for o in self.anchor_re[c].finditer(a, lo, hi)]
                    for m in foreign.finditer(a, lo, hi):
                        if (m.start() < e and s < m.end()) or any(os <= m.start() and m.end() <= oe for os, oe in own):
                            continue  # the mention itself, or inside a candidate's noun ("abnormal *finding*")
                        d = s - m.end() if m.end() <= s else m.start() - e
                        best_d = d if best_d is None else min(best_d, d)
                    if best_d is not None:
                        best = [FOREIGN]
            for c in candidates:
                pat = self.anchor_re.get(c)
                if pat is None:
                    continue
                for m in pat.finditer(a, lo, hi):
                    if m.start() < e and s < m.end():
                        continue
                    d = s - m.end() if m.end() <= s else m.start() - e
                    if best_d is None or d < best_d or (d == best_d and best == [FOREIGN]):
                        best, best_d = [c], d
                    elif d == best_d and c not in best:
                        best.append(c)
            if best:
                return best if len(best) == 1 else []
        return []

    def _read_forms(self, a: str, reading: Reading, taken: list) -> None:
        """Named values. A list of values ("pink, red and white abnormal tissue") is bound as a whole, so its
        head noun after the last item binds every item."""
        matches = [m for m in self.form_re.finditer(a) if self._free(taken, *m.span())]
        lists = self._value_lists(a, matches)
        for m, list_span in zip(matches, lists):
            s, e = m.span()
            form = self.forms[m.group(1)]
            if self._is_noun(form):
                owner = self._owner(a, s, e, self._form_objects(form))
                if owner:
                    # "all polyps have been removed", "no polyp size applies": about removal / size, not a
                    # polyp being present or counted
                    if form.obj:
                        self._object_statement(a, reading, form.obj, s, e, only=owner)
                    taken.append((s, e))
                    continue
            by_value: dict[str, list[str]] = {}
            for c, v in form.meanings:
                by_value.setdefault(v, []).append(c)
            for v, classes in by_value.items():
                # its own clause first ("the abnormality appears green and black landmark mucosa"), then the
                # list's ("pink, red and white abnormal tissue")
                chosen = (self._bind(a, classes, (s, e), clause_only=True) or self._bind(a, classes, list_span)
                          if len(classes) > 1 else None)
                self._add_bound(a, reading, classes, [v], (s, e), summary=False, chosen=chosen,
                                hedged_or=self._or_neighbour(a, s, e), listable=self._is_noun(form))
            taken.append((s, e))
            if form.obj:
                self._object_statement(a, reading, form.obj, s, e)

    def _value_lists(self, a: str, matches: list[re.Match]) -> list[tuple[int, int]]:
        """Per value mention, the span of the list of values it stands in (its own span when alone)."""
        spans = [m.span() for m in matches]
        groups: list[list[int]] = []
        for i, m in enumerate(matches):
            if groups:
                prev = matches[groups[-1][-1]]
                gap = a[prev.end():m.start()]
                same = {c for c, _ in self.forms[prev.group(1)].meanings} & {c for c, _ in self.forms[m.group(1)].meanings}
                if same and LIST_GAP_RE.fullmatch(gap):
                    groups[-1].append(i)
                    continue
            groups.append([i])
        out = list(spans)
        for g in groups:
            for i in g:
                out[i] = (spans[g[0]][0], spans[g[-1]][1])
        return out

    def _form_objects(self, form: _Form) -> set[str]:
        objs = {form.obj} if form.obj else set()
        return objs | {self.classes[c].object for c, _ in form.meanings if self.classes[c].object}

    def _read_topics(self, a: str, reading: Reading) -> None:
        """A denied topic word says its class is none: "no Paris type is given", "no size measurement is
        recorded", "no landmark region is marked" (bound to a class by the object named nearest)."""
        for word_re, classes in self.topic_words:
            for m in word_re.finditer(a):
                if self.polarity_at(a, *m.span()) != "denied":
                    continue
                chosen = self._bind(a, classes, m.span()) if len(classes) > 1 else classes
                for c in chosen:
                    reading.add(Statement(c, frozenset(), "asserted", m.span(), none=True))

    def _or_neighbour(self, a: str, s: int, e: int) -> bool:
        """"red or pink", "pink or red": a value joined by "or" to another value is an alternative, not a
        statement (but "no text or box" denies both: the polarity check comes first)."""
        after = re.match(r"\s*(?:,\s*)?or\s+(?:a\s+|an\s+|the\s+)?", a[e:])
        if after and self.form_re.match(a, e + after.end()):
            return True
        before = re.search(r"\bor\s+(?:a\s+|an\s+|the\s+)?$", a[:s])
        if before:
            prev = a[:before.start()].rstrip(" ,")
            return any(m.end() == len(prev) for m in self.form_re.finditer(prev, max(0, len(prev) - 40)))
        return False

    def _topic_owner(self, a: str, e: int, objects: set[str], s: int | None = None) -> str | None:
        """The class about one of `objects` whose topic word follows the noun ending at `e` ("polyp *size*",
        "landmark *location*") or, given its start `s`, stands right before it ("*residual* polyps"), if any."""
        before = a[max(0, (s or 0) - 40):s] if s is not None else ""
        for name, pat in self.topics:
            obj = self.classes[name].object
            if not (obj in objects or objects & self.includes.get(obj, set())):
                continue
            if pat.match(a, e) or (before and self.topics_before[name].search(before)):
                return name
        return None

    def _owner(self, a: str, s: int, e: int, objects: set[str]) -> str | None:
        """The topic class a noun belongs to, for the statement it makes. A denied noun is its topic's alone ("no
        polyp size applies"); an asserted one still says the thing is there ("a polyp measuring 20 mm is
        present"), except for a topic about its absence ("all polyps have been removed")."""
        owner = self._topic_owner(a, e, objects, s)
        if owner is None:
            return None
        if self.classes[owner].object_absent or self.polarity_at(a, s, e, listable=True) == "denied":
            return owner
        return None

    def _is_noun(self, form: _Form) -> bool:
        """Object nouns and the values of presence classes ("polyp", "snare") are nouns a topic can own;
        colours and places are not ("red in colour" states red)."""
        return form.obj is not None or any(self.classes[c].presence for c, _ in form.meanings)

    def _object_statement(self, a: str, reading: Reading, obj: str, s: int, e: int, only: str | None = None) -> None:
        """A noun of an object ("polyp", "instrument"): denied, it says every class about that object is
        none / zero / absent; asserted, that it exists (presence classes only)."""
        pol = self.polarity_at(a, s, e, listable=True)
        for name, qc_obj in self.class_object.items():
            if only is not None and name != only:
                continue
            if qc_obj != obj and obj not in self.includes[qc_obj]:
                continue
            qc = self.classes[name]
            if pol == "denied" and qc_obj == obj:
                if qc.answer_type == AnswerType.count:
                    reading.add(Statement(name, frozenset(), "asserted", (s, e), interval=(0, 0)))
                elif qc.answer_type == AnswerType.yes_no:
                    if qc.object_absent:
                        reading.add(Statement(name, frozenset(qc.object_absent), "asserted", (s, e)))
                else:
                    reading.add(Statement(name, frozenset(), "asserted", (s, e), none=True))
            elif pol == "asserted" and qc.presence:
                if qc.answer_type == AnswerType.count:
                    reading.add(Statement(name, frozenset(), "hedged", (s, e), interval=(1, math.inf)))
                elif qc.answer_type == AnswerType.yes_no:
                    reading.add(Statement(name, frozenset(["yes"]), "asserted", (s, e)))
                elif qc_obj == obj:
                    reading.add(Statement(name, frozenset(), "hedged", (s, e), none=False, interval=(1, math.inf)))

    def _read_nouns(self, a: str, reading: Reading, taken: list) -> None:
        for m in self.noun_re.finditer(a):
            s, e = m.span()
            if not self._free(taken, s, e):
                continue
            taken.append((s, e))
            obj = self.noun_object[m.group(1)]
            self._object_statement(a, reading, obj, s, e, only=self._owner(a, s, e, {obj}))

    def _number(self, word: str) -> int | None:
        word = word.strip()
        if word.isdigit():
            return int(word)
        return NUMBERS.get(word)

    def _read_counts(self, a: str, reading: Reading) -> None:
        """Counts; their spans block only other counts (the noun of "two polyps" still names a polyp)."""
        counted: list[tuple[int, int]] = []
        for m in self.count_after_re.finditer(a):
            noun, num = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
            n = self._number(num)
            cls = self.count_nouns[noun]
            s, e = m.span()
            pol = self.polarity_at(a, m.start(), m.start() + 1)
            interval = (n, n)
            before = a[:m.start(2) if m.group(2) else m.start(4)]
            for pat, kind in BOUND_BEFORE:
                if pat.search(before):
                    interval, pol = _bound(kind, n), "hedged"
            reading.add(Statement(cls, frozenset(), pol, (s, e), interval=interval))
            counted.append((s, e))
        # a number inside a value ("grade 0-1", "5-10mm") is not a count
        counted += [m.span() for m in self.form_re.finditer(a) if any(ch.isdigit() for ch in m.group(1))]
        for m in self.count_re.finditer(a):
            s, e = m.span()
            if not self._free(counted, s, m.end(1)):
                continue
            head, noun = m.group(1), m.group(3)
            compound = self.count_compound_re.match(a, e)
            if compound:
                noun, e = compound.group(1), compound.end()
            cls = self.count_nouns[noun]
            if head == "no" or self._topic_owner(a, e, {self.classes[cls].object}):
                # "no polyps" is read as a denied object noun (one rule for "no polyps" and "polyps are
                # absent"); "one polyp measures 5 mm" still counts, "no polyp size" is the size's
                if head == "no" or self._number(head) == 0:
                    continue
            counted.append((s, e))
            reading.add(self._count_statement(a, cls, head, (s, e)))

    def _count_statement(self, a: str, cls: str, head: str, span: tuple[int, int]) -> Statement:
        s, e = span
        pol = self.polarity_at(a, s, e)
        if head in QUANTIFIERS:
            lo, hi = QUANTIFIERS[head]
            return Statement(cls, frozenset(), "hedged" if pol != "denied" else "denied", span, interval=(lo, hi))
        parts = [p for p in re.split(r"\s*(?:or|to|-)\s*", head) if p]
        nums = [self._number(p) for p in parts]
        if len(nums) > 1:
            return Statement(cls, frozenset(), "hedged", span, interval=(min(nums), max(nums)))
        n = nums[0]
        interval = (n, n)
        before = a[:s]
        kind = next((k for pat, k in BOUND_BEFORE if pat.search(before)), None)
        if OR_MORE_RE.match(a, s + len(head)):
            kind = "ge" if "fewer" not in a[s:e + 10] and "less" not in a[s:e + 10] else "le"
        if kind:
            return Statement(cls, frozenset(), "hedged" if pol != "denied" else "denied", span,
                             interval=_bound(kind, n))
        return Statement(cls, frozenset(), pol, span, interval=interval)

    def _read_polarity(self, a: str, reading: Reading, taken: list) -> None:
        """yes/no classes: a cue states its `affirmative` value when asserted, every other value when denied."""
        value_spans = [m.span() for m in self.form_re.finditer(a) if not self.forms[m.group(1)].obj]
        for name, cues in self.polarity.items():
            qc = self.classes[name]
            phrased = list(reading.of(name))
            for pattern, affirmative in cues:
                for m in pattern.finditer(a):
                    s, e = m.span()
                    if any(ts <= s < te for ts, te in value_spans) or any(
                            st.span[0] < self._clause(a, s, e)[1] and self._clause(a, s, e)[0] <= st.span[0]
                            for st in phrased):
                        # inside another value ("dyed *resection* margins") or in a clause a value phrase of
                        # this class states ("polyp *removal* is not applicable")
                        continue
                    pol = self.polarity_at(a, s, e, listable=True)
                    if pol == "denied":
                        values = frozenset(v for v in qc.values if v != affirmative)
                        pol = "asserted"
                    else:
                        values = frozenset([affirmative])
                    reading.add(Statement(name, values, pol, (s, e)))

    def _read_terse(self, a: str, reading: Reading) -> None:
        """A whole answer that is one word: "yes", "no", "none", "2". Which class it answers is the plan's
        business (`generate.grounding`): it is recorded under the pseudo class "" for the checker."""
        word = re.sub(r"[^\w\s'-]", "", a).strip()
        if word in ("yes", "no", "none", "not relevant", "not applicable", "n/a") or self._number(word) is not None:
            reading.add(Statement("", frozenset([word]), "asserted", (0, len(a))))


def _bound(kind: str, n: int) -> tuple[float, float]:
    return {"gt": (n + 1, math.inf), "ge": (n, math.inf), "lt": (0, n - 1), "le": (0, n),
            "about": (max(0, n - 1), n + 1)}[kind]
