"""The catalog is validated when loaded: a broken entry fails with the class named."""

from __future__ import annotations

import pydantic
import pytest
import yaml

from kvqa.catalog import DEFAULT_CATALOG_PATH, load_catalog


def _edited(tmp_path, edit):
    data = yaml.safe_load(DEFAULT_CATALOG_PATH.read_text())
    edit(data)
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))  # vocabulary order is part of a class
    return path


def test_shipped_catalog_has_the_18_release_classes_and_the_new_ones(catalog):
    assert sum(bool(qc.source_questions) for qc in catalog.classes.values()) == 18
    assert {n for n, qc in catalog.classes.items() if not qc.source_questions} == {
        "ulcerative_colitis_grade", "oesophagitis_grade", "bowel_prep_quality", "therapeutic_state",
        "retroflex_view", "polyp_relative_size", "instrument_relative_size"}
    assert catalog.class_by_question["How many instrumnets are in the image?"].name == "instrument_count"
    assert catalog.template_version.startswith("catalog-v1+")


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["classes"]["procedure_type"]["feeds"][0]["map"].update({"Lower GI": "sigmoidoscopy"}),
     "maps to values outside the vocabulary: ['sigmoidoscopy']"),
    (lambda d: d["classes"]["polyp_count"]["feeds"][0].update(derive="location"),
     "derive 'location' needs answer type"),
    (lambda d: d["classes"]["polyp_relative_size"]["values"].pop("large"), "relative_size needs the values"),
    (lambda d: d["classes"]["retroflex_view"]["feeds"][0].update(kind="csv"), "feeds.0"),
    (lambda d: d["classes"]["therapeutic_state"].pop("feeds"), "needs source_questions"),
])
def test_bad_feeds_are_reported_with_the_class(tmp_path, edit, message):
    with pytest.raises(pydantic.ValidationError) as err:
        load_catalog(_edited(tmp_path, edit))
    assert message in str(err.value)


def test_row_provenance_hashes_only_the_classes_it_uses(tmp_path, catalog):
    def edit(d):
        d["classes"]["polyp_count"]["questions"].append("Count the polyps: how many are there?")
    edited = load_catalog(_edited(tmp_path, edit))
    assert edited.classes_version(["text_presence"]) == catalog.classes_version(["text_presence"])
    assert edited.classes_version(["polyp_count", "text_presence"]) != \
        catalog.classes_version(["polyp_count", "text_presence"])


def test_missing_answer_template_is_reported(tmp_path):
    path = _edited(tmp_path, lambda d: d["classes"]["polyp_count"]["answers"].pop("many"))
    with pytest.raises(pydantic.ValidationError, match="polyp_count.*many"):
        load_catalog(path)


def test_unknown_answer_type_is_reported(tmp_path):
    path = _edited(tmp_path, lambda d: d["classes"]["text_presence"].update(answer_type="essay"))
    with pytest.raises(pydantic.ValidationError, match="answer_type"):
        load_catalog(path)


def test_a_question_claimed_twice_is_reported(tmp_path):
    def edit(d):
        d["classes"]["polyp_count"]["source_questions"].append("Is there text?")
    with pytest.raises(pydantic.ValidationError, match="claimed by"):
        load_catalog(_edited(tmp_path, edit))


def test_new_class_is_a_catalog_edit(tmp_path, catalog):
    def edit(d):
        d["classes"]["bowel_prep_score"] = {
            "source_questions": ["What is the Boston Bowel Preparation Scale score?"],
            "answer_type": "single_choice",
            "values": {"bbps 0-1": {}, "bbps 2-3": {}},
            "question_cues": [["bbps", "boston", "bowel preparation"]],
            "questions": ["What is the BBPS score?"],
            "answers": {"value": ["bowel preparation scored {value}"]},
        }
    cat = load_catalog(_edited(tmp_path, edit))
    assert cat.class_by_question["What is the Boston Bowel Preparation Scale score?"].name == "bowel_prep_score"
    assert cat.digest != catalog.digest
