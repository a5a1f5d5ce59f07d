"""The grounding check against two hand-written corpora (tests/data/grounding_*.yaml).

The check is the only judge of LLM-written rows, so it must reject every wrong answer written the way LLMs
write them (denials, other values, hedges, swapped values, invented findings, answers that leave a fact
out, questions that miss, overreach, copy or echo) and accept every right one (terse labels, real-text
wordings, several facts in one sentence, right negations). Every failing case is listed, not only the first.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import yaml

from generate.backends import PlanFact
from generate.grounding import GroundingChecker
from kvqa.catalog import MULTI_VALUED, AnswerType, Catalog
from sources.conflicts import fired_rules

DATA = Path(__file__).resolve().parent / "data"
ADVERSARIAL = DATA / "grounding_adversarial.yaml"
FAITHFUL = DATA / "grounding_faithful.yaml"

ADVERSARIAL_KINDS = {"denial", "wrong_value", "negation_elsewhere", "hedge", "swapped", "invented", "none_denial",
                     "missing", "question_substring", "question_off_target", "question_copy", "question_echo"}
FAITHFUL_KINDS = {"terse", "paraphrase", "x1_style", "multi_fact", "negative_phrasing"}
MAIN_CLASSES = {"procedure_type", "text_presence", "polyp_removal_status", "box_artifact_presence",
                "instrument_count", "finding_count", "polyp_type", "polyp_size", "instrument_location",
                "instrument_presence", "polyp_count", "abnormality_color", "abnormality_location",
                "abnormality_presence", "finding_presence", "landmark_presence", "landmark_location",
                "landmark_color"}
CASE_KEYS = {"kind", "facts", "image", "question", "answer", "llm"}


def load_cases(path: Path) -> list[dict]:
    return yaml.safe_load(path.read_text())["cases"]


@pytest.fixture(scope="module")
def adversarial() -> list[dict]:
    return load_cases(ADVERSARIAL)


@pytest.fixture(scope="module")
def faithful() -> list[dict]:
    return load_cases(FAITHFUL)


@pytest.fixture(scope="module")
def checker(catalog: Catalog) -> GroundingChecker:
    return GroundingChecker(catalog)


def plan_facts(catalog: Catalog, entries: list[dict], prefix: str) -> list[PlanFact]:
    """PlanFacts as the pipeline builds them: answer type from the catalog, the atomic source question."""
    out = []
    for j, entry in enumerate(entries):
        qc = catalog.classes[entry["class"]]
        values = tuple(entry["values"])
        out.append(PlanFact(f"{prefix}-{j}", qc.name, str(qc.answer_type), values, qc.atomic_question,
                            "; ".join(values)))
    return out


def judge(checker: GroundingChecker, catalog: Catalog, case: dict, n: int):
    facts = plan_facts(catalog, case["facts"], f"c{n}")
    image = plan_facts(catalog, case.get("image", []), f"c{n}-image")
    return checker.check(case["question"], case["answer"], facts, image_facts=facts + image,
                         llm=bool(case.get("llm", False)))


def describe(n: int, case: dict) -> str:
    facts = "; ".join(f"{f['class']}={f['values']}" for f in case["facts"])
    return f"#{n} [{case['kind']}] {facts} | Q: {case['question']} | A: {case['answer']}"


def test_every_adversarial_case_is_rejected(checker, catalog, adversarial):
    accepted = [describe(n, c) for n, c in enumerate(adversarial) if judge(checker, catalog, c, n) is None]
    assert not accepted, f"{len(accepted)} of {len(adversarial)} wrong cases accepted:\n" + "\n".join(accepted)


def test_every_faithful_case_is_accepted(checker, catalog, faithful):
    rejected = []
    for n, case in enumerate(faithful):
        violation = judge(checker, catalog, case, n)
        if violation is not None:
            rejected.append(f"{describe(n, case)} -> {violation.reason}: {violation.detail}")
    assert not rejected, f"{len(rejected)} of {len(faithful)} right cases rejected:\n" + "\n".join(rejected)


def test_the_corpora_cover_every_kind_and_main_class(adversarial, faithful):
    assert len(adversarial) >= 300 and len(faithful) >= 150
    kinds = Counter(c["kind"] for c in adversarial)
    assert set(kinds) == ADVERSARIAL_KINDS, set(kinds) ^ ADVERSARIAL_KINDS
    assert min(kinds.values()) >= 15, kinds
    assert {c["kind"] for c in faithful} == FAITHFUL_KINDS
    per_class = Counter(f["class"] for c in adversarial for f in c["facts"])
    thin = {name: per_class[name] for name in MAIN_CLASSES if per_class[name] < 5}
    assert not thin, f"main classes with fewer than 5 adversarial cases: {thin}"
    assert MAIN_CLASSES <= {f["class"] for c in faithful for f in c["facts"]}
    # The LLM-only question checks are what catch copies and echoes; nothing else needs them.
    assert all(c.get("llm") for c in adversarial if c["kind"] in {"question_copy", "question_echo"})
    assert not any(c.get("llm") for c in faithful)


@pytest.mark.parametrize("path", [ADVERSARIAL, FAITHFUL], ids=["adversarial", "faithful"])
def test_every_class_and_value_is_in_the_catalog(catalog, path):
    """A typo in a class or value (or an unquoted yes/no read as a boolean) would make a case vacuous."""
    problems, seen = [], set()
    for n, case in enumerate(load_cases(path)):
        before = len(problems)
        if set(case) - CASE_KEYS or not {"kind", "facts", "question", "answer"} <= set(case):
            problems.append(f"#{n}: keys {sorted(case)}")
        if not (isinstance(case.get("question"), str) and case["question"].strip()
                and isinstance(case.get("answer"), str) and case["answer"].strip()):
            problems.append(f"#{n}: question and answer must be non-empty strings")
        key = (case.get("question"), case.get("answer"), repr(case.get("facts")))
        if key in seen:
            problems.append(f"#{n}: duplicate case")
        seen.add(key)
        if not case.get("facts"):
            problems.append(f"#{n}: no plan facts")
        entries = [*case.get("facts", []), *case.get("image", [])]
        classes = [e.get("class") for e in entries]
        if len(set(classes)) != len(classes):
            problems.append(f"#{n}: a class appears twice in facts + image: {classes}")
        for entry in entries:
            qc = catalog.classes.get(entry.get("class"))
            values = entry.get("values")
            if qc is None:
                problems.append(f"#{n}: unknown class {entry.get('class')!r}")
                continue
            if not values or not all(isinstance(v, str) for v in values):
                problems.append(f"#{n}: {qc.name} values must be a non-empty list of strings: {values!r}")
                continue
            if qc.answer_type == AnswerType.count:
                bad = [v for v in values if not v.isdigit()]
            else:
                bad = [v for v in values if v not in qc.values]
            if len(values) > 1 and (qc.answer_type not in MULTI_VALUED or "none" in values):
                bad.append(f"{values} (one value only)")
            if bad:
                problems.append(f"#{n}: {qc.name} has no value(s) {bad}")
        if len(problems) == before and (rules := fired_rules(catalog, {e["class"]: e["values"] for e in entries})):
            problems.append(f"#{n}: the image facts break conflict rule(s) {[r.name for r, _ in rules]}")
    assert not problems, "\n".join(problems)
