"""The question-class catalog (`prompts/question_classes.yaml`) as a validated, typed model.

The catalog is data: verbatim source questions, answer types, vocabularies with synonyms and typos, and
phrasings. Code only interprets it, so adding a question class whose answer type exists is a YAML edit.
"""

from __future__ import annotations

import hashlib
from enum import StrEnum
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from kvqa.text import normalise_text

DEFAULT_CATALOG_PATH = Path(__file__).resolve().parent.parent / "prompts" / "question_classes.yaml"


class AnswerType(StrEnum):
    yes_no = "yes_no"
    single_choice = "single_choice"
    multi_choice = "multi_choice"
    count = "count"
    color = "color"
    location = "location"


# Answer types whose answer is a set of values (possibly the single value "none").
MULTI_VALUED = {AnswerType.multi_choice, AnswerType.color, AnswerType.location}

# The template keys each answer type needs (see the catalog header).
REQUIRED_ANSWER_KEYS: dict[AnswerType, set[str]] = {
    AnswerType.count: {"zero", "one", "many"},
    AnswerType.multi_choice: {"values"},
    AnswerType.color: {"values"},
    AnswerType.location: {"values"},
    AnswerType.single_choice: {"value"},
}


class ValueSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    display: str | None = None
    synonyms: list[str] = Field(default_factory=list)


class PolarityCue(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pattern: str
    affirmative: str


class LabelFeed(BaseModel):
    """A field of a per-image label file (HyperKvasir `image-labels.csv`) feeds this class.

    Each label row whose `field` takes a value named in `map` gives a fact with the mapped value; rows with
    other values give none, unless `default` is set. `when` restricts the feed to rows whose fields take
    one of the listed values (e.g. a retroflex "no" only for anatomical-landmark images).
    """

    model_config = ConfigDict(extra="forbid")
    kind: Literal["label"] = "label"
    field: str
    map: dict[str, str] = Field(min_length=1)
    default: str | None = None
    when: dict[str, list[str]] = Field(default_factory=dict)


BOX_DERIVATIONS = {"count": {AnswerType.count}, "location": {AnswerType.location},
                   "relative_size": {AnswerType.multi_choice}, "presence": {AnswerType.yes_no}}


class BoxFeed(BaseModel):
    """The boxes of one label (`polyp`, `instrument`) feed this class; `derive` says how (sources/boxes.py)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["boxes"] = "boxes"
    label: str
    derive: Literal["count", "location", "relative_size", "presence"]


Feed = Annotated[LabelFeed | BoxFeed, Field(discriminator="kind")]
RELATIVE_SIZES = ("small", "medium", "large")


class ConflictCondition(BaseModel):
    """A condition on one class's fact of an image: it holds when the image has a fact of `class` whose
    values include one of `any_of`, or include none of `none_of`, or (neither given) has any value.
    Count values are decimal strings: `any_of: ["0"]` is "no polyp", `none_of: ["0"]` "at least one"."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    question_class: str = Field(alias="class")
    any_of: list[str] | None = Field(default=None, min_length=1)
    none_of: list[str] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one_test(self) -> "ConflictCondition":
        if self.any_of is not None and self.none_of is not None:
            raise ValueError(f"condition on {self.question_class!r}: give any_of or none_of, not both")
        return self

    def holds(self, values: Sequence[str]) -> bool:
        if self.any_of is not None:
            return any(v in self.any_of for v in values)
        if self.none_of is not None:
            return not any(v in self.none_of for v in values)
        return True

    def describe(self) -> str:
        if self.any_of is not None:
            return f"{self.question_class} in {self.any_of}"
        if self.none_of is not None:
            return f"{self.question_class} not in {self.none_of}"
        return f"{self.question_class} given"


class ConflictRule(BaseModel):
    """Labels of different classes that cannot all be true of one image (applied in sources/conflicts.py).

    The rule fires on an image when `when` holds and at least one condition of `conflicts_with` holds;
    the facts of `when`'s class and of every `conflicts_with` condition that holds are then quarantined
    there (`label_conflict`), since which of the two labels is wrong cannot be told.
    """

    model_config = ConfigDict(extra="forbid")
    name: str
    why: str
    when: ConflictCondition
    conflicts_with: list[ConflictCondition] = Field(min_length=1)

    @property
    def conditions(self) -> list[ConflictCondition]:
        return [self.when, *self.conflicts_with]


class ObjectSpec(BaseModel):
    """A thing question classes describe (polyp, instrument, landmark...): the nouns that name it, and the
    objects it includes (a polyp is an abnormality). The grounding reader (`generate.reader`) reads "no
    instruments" as every instrument class being none / zero, and binds a shared-vocabulary value ("red",
    "center") to the class whose object is named nearest to it."""

    model_config = ConfigDict(extra="forbid")
    nouns: list[str] = Field(min_length=1)
    includes: list[str] = Field(default_factory=list)


class QuestionClass(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    source_questions: list[str] = Field(default_factory=list)
    feeds: list[Feed] = Field(default_factory=list)
    answer_type: AnswerType
    values: dict[str, ValueSpec] = Field(default_factory=dict)
    noun: list[str] | None = None
    question_cues: list[list[str]] = Field(min_length=1)
    polarity_cues: list[PolarityCue] = Field(default_factory=list)
    value_phrases: dict[str, list[str]] = Field(default_factory=dict)
    questions: list[str] = Field(min_length=1)
    answers: dict[str, list[str]]
    # The answer can change when the frame is cropped, rotated or shifted (the augmented track's geometric
    # base): where things are, how much of the frame they fill, how many are in it, overlays at its edges.
    frame_dependent: bool = False
    # Grounding (generate/reader.py): the object the class describes; whether it says that object is there
    # (presence, counts); the yes/no values that hold when the object is absent ("no polyps": removal yes or
    # not relevant); words after a noun that make the noun this class's topic ("polyp *size*"); questions
    # that show the class is asked when it is not in the plan (default: question_cues); whether a value
    # named in an answer with no fact of this class on the image is an invented finding.
    object: str | None = None
    presence: bool = False
    object_absent: list[str] = Field(default_factory=list)
    topic_words: list[str] = Field(default_factory=list)
    off_target_cues: list[list[str]] | None = None
    implies: dict[str, dict[str, list[str]]] = Field(default_factory=dict)
    check_unsupported: bool = True

    @model_validator(mode="after")
    def _check_templates(self) -> "QuestionClass":
        needed = set(REQUIRED_ANSWER_KEYS.get(self.answer_type, set()))
        if self.answer_type == AnswerType.yes_no:
            needed = set(self.values)
        if self.answer_type in MULTI_VALUED and "none" in self.values:
            needed.add("none")
        missing = needed - set(self.answers)
        if missing:
            raise ValueError(f"class {self.name!r}: answer templates missing for {sorted(missing)}")
        if self.answer_type != AnswerType.count and not self.values:
            raise ValueError(f"class {self.name!r}: a {self.answer_type} class needs a vocabulary")
        if self.answer_type == AnswerType.yes_no:
            stated = {c.affirmative for c in self.polarity_cues} | set(self.value_phrases)
            if not self.polarity_cues or not stated <= set(self.values):
                raise ValueError(f"class {self.name!r}: a yes_no class needs polarity_cues over its values")
        if self.answer_type == AnswerType.count and not self.noun:
            raise ValueError(f"class {self.name!r}: a count class needs its noun [singular, plural]")
        empty = [k for k, v in self.answers.items() if not v]
        if empty:
            raise ValueError(f"class {self.name!r}: empty answer template lists {empty}")
        if not self.source_questions and not self.feeds:
            raise ValueError(f"class {self.name!r}: needs source_questions (Kvasir-VQA) or feeds (label fields, boxes)")
        if not self.frame_dependent and (self.answer_type in (AnswerType.location, AnswerType.count)
                                         or any(isinstance(f, BoxFeed) for f in self.feeds)):
            raise ValueError(f"class {self.name!r}: a {self.answer_type} class or one fed by boxes depends on the "
                             "frame: set frame_dependent: true")
        self._check_feeds()
        return self

    def _check_feeds(self) -> None:
        for feed in self.feeds:
            if isinstance(feed, LabelFeed):
                mapped = [*feed.map.values(), *([feed.default] if feed.default else [])]
                bad = [v for v in mapped if v not in self.values] if self.answer_type != AnswerType.count \
                    else [v for v in mapped if not v.isdigit()]
                if bad:
                    raise ValueError(f"class {self.name!r}: feed of {feed.field!r} maps to values outside the "
                                     f"vocabulary: {bad}")
            elif self.answer_type not in BOX_DERIVATIONS[feed.derive]:
                raise ValueError(f"class {self.name!r}: derive {feed.derive!r} needs answer type "
                                 f"{sorted(BOX_DERIVATIONS[feed.derive])}, not {self.answer_type}")
            elif feed.derive == "relative_size" and not set(RELATIVE_SIZES) <= set(self.values):
                raise ValueError(f"class {self.name!r}: relative_size needs the values {list(RELATIVE_SIZES)}")
            elif feed.derive == "presence" and set(self.values) != {"yes", "no"}:
                raise ValueError(f"class {self.name!r}: presence needs the values yes and no")

    @property
    def atomic_question(self) -> str:
        """The verbatim atomic question of the `original` column: the source's, else the first phrasing."""
        return self.source_questions[0] if self.source_questions else self.questions[0]

    @cached_property
    def lookup(self) -> dict[str, str]:
        """Normalised surface form (canonical, synonym or typo) -> canonical value."""
        table: dict[str, str] = {}
        for canonical, spec in self.values.items():
            for form in (canonical, *spec.synonyms):
                table[normalise_text(form)] = canonical
        return table

    def display(self, value: str) -> str:
        spec = self.values.get(value)
        return spec.display if spec is not None and spec.display else value

    def sort_key(self, value: str) -> int:
        """Vocabulary order, so canonical value lists do not depend on the order the labeller clicked."""
        return list(self.values).index(value)


class Catalog(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int
    dropped_questions: list[str]
    empty_questions: list[str]
    value_separator: str
    classes: dict[str, QuestionClass]
    location_grid: dict[str, ValueSpec]
    conflicts: dict[str, ConflictRule] = Field(default_factory=dict)
    objects: dict[str, ObjectSpec] = Field(default_factory=dict)
    digest: str = ""

    @model_validator(mode="before")
    @classmethod
    def _name_classes_and_grid(cls, data: dict) -> dict:
        grid = data.get("location_grid", {})
        for name, spec in data.get("classes", {}).items():
            spec.setdefault("name", name)
            if spec.get("answer_type") == AnswerType.location and "values" not in spec:
                spec["values"] = grid
        for name, rule in (data.get("conflicts") or {}).items():
            if isinstance(rule, dict):
                rule.setdefault("name", name)
        return data

    @model_validator(mode="after")
    def _unique_questions(self) -> "Catalog":
        seen: dict[str, str] = {}
        for qc in self.classes.values():
            for q in qc.source_questions:
                if q in seen:
                    raise ValueError(f"source question {q!r} claimed by {seen[q]!r} and {qc.name!r}")
                seen[q] = qc.name
        return self

    @model_validator(mode="after")
    def _check_conflicts(self) -> "Catalog":
        """A rule may name only catalog classes and values of their vocabularies, each class once."""
        for rule in self.conflicts.values():
            named = [c.question_class for c in rule.conditions]
            if len(set(named)) != len(named):
                raise ValueError(f"conflict rule {rule.name!r}: a class appears in two conditions {named}")
            for cond in rule.conditions:
                qc = self.classes.get(cond.question_class)
                if qc is None:
                    raise ValueError(f"conflict rule {rule.name!r}: unknown class {cond.question_class!r}")
                listed = (cond.any_of or []) + (cond.none_of or [])
                bad = [v for v in listed if not v.isdigit()] if qc.answer_type == AnswerType.count \
                    else [v for v in listed if v not in qc.values]
                if bad:
                    raise ValueError(f"conflict rule {rule.name!r}: {bad} not values of {qc.name}")
        return self

    @model_validator(mode="after")
    def _check_objects(self) -> "Catalog":
        """Objects, their inclusions and the classes' implications name only what the catalog has."""
        for name, obj in self.objects.items():
            bad = [o for o in obj.includes if o not in self.objects]
            if bad:
                raise ValueError(f"object {name!r} includes unknown objects {bad}")
        for qc in self.classes.values():
            if qc.object is not None and qc.object not in self.objects:
                raise ValueError(f"class {qc.name!r}: unknown object {qc.object!r}")
            bad = [v for v in qc.object_absent if v not in qc.values]
            for value, implied in qc.implies.items():
                bad += [value] if value not in qc.values else []
                for cls, values in implied.items():
                    other = self.classes.get(cls)
                    bad += [f"{cls}={v}" for v in values if other is None or v not in other.values]
            if bad:
                raise ValueError(f"class {qc.name!r}: object_absent / implies name unknown values {bad}")
        return self

    @cached_property
    def class_by_question(self) -> dict[str, QuestionClass]:
        return {q.strip(): qc for qc in self.classes.values() for q in qc.source_questions}

    def classes_version(self, names) -> str:
        """Catalog version plus a hash of just these classes' entries: a row's template provenance."""
        entries = (self.classes[n].model_dump_json() for n in sorted(set(names)))
        return f"catalog-v{self.version}+{hashlib.sha256(chr(31).join(entries).encode()).hexdigest()[:12]}"

    @property
    def template_version(self) -> str:
        """What goes into every row's provenance: catalog version plus a hash of its exact text."""
        return f"catalog-v{self.version}+{self.digest[:12]}"


# libyaml's safe loader when PyYAML has it: the same data, 9x faster on the catalog (a command loads it
# several times: 0.6 s in pure Python).
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_catalog(path: Path | str = DEFAULT_CATALOG_PATH) -> Catalog:
    """Load and validate the catalog; a bad entry fails here with the class named, not mid-run."""
    raw = Path(path).read_bytes()
    data = yaml.load(raw, Loader=SAFE_LOADER)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a catalog is a mapping (version, classes, ...), not a {type(data).__name__}")
    data["digest"] = hashlib.sha256(raw).hexdigest()
    return Catalog.model_validate(data)
