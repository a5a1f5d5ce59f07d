"""Parsing Kvasir-VQA metadata: the real 1,814-row slice and deliberately broken rows."""

from __future__ import annotations

import csv
from collections import Counter

import pytest

from kvqa.config import KvasirVQASource
from sources import read_sources
from sources.kvasir_vqa import AnswerError, parse_answer


def _parse(csv_path, catalog):
    return read_sources([KvasirVQASource(metadata_csv=csv_path, image_dir=csv_path.parent)], catalog)


def test_real_metadata_reconciles_and_covers_every_class(real_csv, catalog):
    parsed = _parse(real_csv, catalog)
    with open(real_csv, newline="") as f:
        n_rows = sum(1 for _ in csv.DictReader(f))
    assert parsed.rows_read == n_rows == 1814
    assert parsed.facts["source_rows"].map(len).sum() + len(parsed.quarantine) == n_rows
    # Every line number appears exactly once, in a fact or in the quarantine.
    lines = [ln for rows in parsed.facts["source_rows"] for ln in rows]
    lines += [int(k.split()[1]) for k in parsed.quarantine["key"]]
    assert sorted(lines) == list(range(2, n_rows + 2))
    assert set(parsed.facts["question_class"]) == {n for n, qc in catalog.classes.items() if qc.source_questions}
    assert parsed.quarantine["reason"].value_counts().to_dict() == {"dropped_question": 133, "label_conflict": 2}
    # One fact per (img_id, class).
    assert not parsed.facts.duplicated(["img_id", "question_class"]).any()
    assert parsed.facts["img_id"].nunique() == 300


def test_real_quirks_are_normalised(real_csv, catalog):
    facts = _parse(real_csv, catalog).facts.set_index(["img_id", "question_class"])
    values = facts["values"].map(list)
    # Two rows, one per polyp: merged into a union in vocabulary order.
    assert values[("cl8k2u1po1dxn08328vz50fyd", "polyp_type")] == ["paris ip", "paris is"]
    assert len(facts.loc[("cl8k2u1po1dxn08328vz50fyd", "polyp_type"), "source_rows"]) == 2
    assert facts.loc[("cl8k2u1po1dxn08328vz50fyd", "polyp_type"), "source_answer"] == "paris ip; paris is"
    all_values = Counter(v for vs in values for v in vs)
    assert "lower-rigth" not in all_values and all_values["lower-right"] > 0
    assert ">20" not in all_values and all_values[">20mm"] > 0
    # "11-20mm;5-10mm" (no space) parses into two canonical values.
    assert any(v == ["5-10mm", "11-20mm"] for v in values)
    # Counts are canonical integers; the misspelt instrument question maps onto instrument_count.
    assert set(facts.xs("instrument_count", level=1)["source_question"]) == {"How many instrumnets are in the image?"}


def test_bad_rows_are_quarantined_with_reasons(tmp_path, catalog):
    path = tmp_path / "meta.csv"
    path.write_text(
        "source,question,answer,img_id\n"
        "Polyps,Is there text?,yes,img1\n"
        "Polyps,Is there text?,yes\n"                                          # malformed: 3 fields
        "Polyps,What is the meaning of life?,42,img1\n"                       # unknown question
        "Polyps,How many polyps are in the image?,many,img1\n"                # bad count
        "Polyps,What color is the abnormality? If more than one separate with ;,pink; plaid,img1\n"
        "Polyps,none,,img1\n"                                                  # empty question
        "Polyps,Is this finding easy to detect?,yes,img1\n"                    # dropped
        "Polyps,Have all polyps been removed?,yes,img1\n"
        "Polyps,Have all polyps been removed?,no,img1\n"                       # conflicts with the row above
        "Polyps,What type of procedure is the image taken from?,colonoscopy; gastroscopy,img1\n"
        "Polyps,Are there any instruments in the image? Check all that are present.,none; tube,img1\n"
        "Polyps,Is there a green/black box artefact?,,img1\n"                 # empty answer
        ",Is there text?,no,\n"                                                # no img_id
        "Normal,Is there text?,no,img1\n"                                      # contradicts img1's category
    )
    parsed = _parse(path, catalog)
    assert parsed.rows_read == 14
    assert len(parsed.facts) == 1 and parsed.facts.iloc[0]["question_class"] == "text_presence"
    reasons = dict(zip(parsed.quarantine["key"], parsed.quarantine["reason"]))
    assert reasons == {
        "line 3": "malformed_row", "line 4": "unknown_question", "line 5": "bad_count",
        "line 6": "unknown_value", "line 7": "empty_question", "line 8": "dropped_question",
        "line 9": "conflicting_answers", "line 10": "conflicting_answers", "line 11": "too_many_values",
        "line 12": "contradictory_values", "line 13": "empty_answer", "line 14": "malformed_row",
        "line 15": "conflicting_source",
    }
    assert parsed.facts["source_rows"].map(len).sum() + len(parsed.quarantine) == parsed.rows_read
    assert (parsed.quarantine["detail"].str.len() > 0).all()


def test_missing_header_is_a_clear_error(tmp_path, catalog):
    path = tmp_path / "meta.csv"
    path.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(ValueError, match="lacks"):
        _parse(path, catalog)


@pytest.mark.parametrize("cls,answer,expected", [
    ("landmark_location", "center; lower-rigth", ("center", "lower-right")),
    ("polyp_size", ">20", (">20mm",)),
    ("abnormality_color", "red; pink", ("pink", "red")),
    ("instrument_count", "03", ("3",)),
    ("procedure_type", "Colonoscopy", ("colonoscopy",)),
])
def test_parse_answer_normalises(catalog, cls, answer, expected):
    assert parse_answer(catalog.classes[cls], answer) == expected


def test_parse_answer_rejects_unknown(catalog):
    with pytest.raises(AnswerError) as err:
        parse_answer(catalog.classes["landmark_presence"], "duodenum")
    assert err.value.reason == "unknown_value"
