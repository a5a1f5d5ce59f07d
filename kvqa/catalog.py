"""The question-class catalog (`prompts/question_classes.yaml`) as a validated, typed model.

The catalog is data: verbatim source questions, answer types, vocabularies with synonyms and typos, and
phrasings. Code only interprets it, so adding a question class whose answer type exists is a YAML edit.
"""

from __future__ import annotations

import hashlib
from enum import StrEnum
from functools import cached_property
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

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


class QuestionClass(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    source_questions: list[str]
    answer_type: AnswerType
    values: dict[str, ValueSpec] = Field(default_factory=dict)
    noun: list[str] | None = None
    question_cues: list[list[str]] = Field(min_length=1)
    polarity_cues: list[PolarityCue] = Field(default_factory=list)
    value_phrases: dict[str, list[str]] = Field(default_factory=dict)
    questions: list[str] = Field(min_length=1)
    answers: dict[str, list[str]]

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
        return self

    @cached_property
    def lookup(self) -> dict[str, str]:
        """Normalised surface form (canonical, synonym or typo) -> canonical value."""
        table: dict[str, str] = {}
        for canonical, spec in self.values.items():
            for form in (canonical, *spec.synonyms):
                table[normalise_token(form)] = canonical
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
    digest: str = ""

    @model_validator(mode="before")
    @classmethod
    def _name_classes_and_grid(cls, data: dict) -> dict:
        grid = data.get("location_grid", {})
        for name, spec in data.get("classes", {}).items():
            spec.setdefault("name", name)
            if spec.get("answer_type") == AnswerType.location and "values" not in spec:
                spec["values"] = grid
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

    @cached_property
    def class_by_question(self) -> dict[str, QuestionClass]:
        return {q.strip(): qc for qc in self.classes.values() for q in qc.source_questions}

    @property
    def template_version(self) -> str:
        """What goes into every row's provenance: catalog version plus a hash of its exact text."""
        return f"catalog-v{self.version}+{self.digest[:12]}"


def normalise_token(text: str) -> str:
    return " ".join(text.strip().lower().split())


def load_catalog(path: Path | str = DEFAULT_CATALOG_PATH) -> Catalog:
    """Load and validate the catalog; a bad entry fails here with the class named, not mid-run."""
    raw = Path(path).read_bytes()
    data = yaml.safe_load(raw)
    data["digest"] = hashlib.sha256(raw).hexdigest()
    return Catalog.model_validate(data)
