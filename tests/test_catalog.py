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
    path.write_text(yaml.safe_dump(data))
    return path


def test_shipped_catalog_has_the_18_release_classes(catalog):
    assert len(catalog.classes) == 18
    assert catalog.class_by_question["How many instrumnets are in the image?"].name == "instrument_count"
    assert catalog.template_version.startswith("catalog-v1+")


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
