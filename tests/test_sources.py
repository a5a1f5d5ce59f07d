"""Parsing Kvasir-VQA metadata: the real 1,814-row slice and deliberately broken rows."""

from __future__ import annotations

import csv
from collections import Counter

import pytest

from conftest import SAMPLE_DIR
from kvqa.config import KvasirVQASource
from sources import LabelFileError, bad_id, read_sources, units_in_facts
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
        ",Is there text?,no,\n"                                                # no img_id: bad_id
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
        "line 12": "contradictory_values", "line 13": "empty_answer", "line 14": "bad_id",
        "line 15": "conflicting_source",
    }
    assert parsed.facts["source_rows"].map(len).sum() + len(parsed.quarantine) == parsed.rows_read
    assert (parsed.quarantine["detail"].str.len() > 0).all()


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


# --- Broken and hostile label files -------------------------------------------------------------------------

SAMPLE_CSV = SAMPLE_DIR / "metadata.csv"


def _units(parsed) -> dict[int, str]:
    """line number -> "fact" or its quarantine reason: where every line of the file ended."""
    out = {ln: "fact" for rows in parsed.facts["source_rows"] for ln in rows}
    out.update({int(k.split()[1]): r for k, r in zip(parsed.quarantine["key"], parsed.quarantine["reason"])})
    return out


def test_an_unterminated_quote_garbles_only_its_own_line(tmp_path, catalog):
    """A `"` at the start of line 6 used to merge the 619 lines after it into one field of one malformed row."""
    lines = SAMPLE_CSV.read_text().splitlines(keepends=True)
    lines[5] = '"' + lines[5]
    path = tmp_path / "metadata.csv"
    path.write_text("".join(lines))
    clean, broken = _parse(SAMPLE_CSV, catalog), _parse(path, catalog)
    assert broken.rows_read == clean.rows_read == len(lines) - 1 == 624
    assert broken.rows_read == units_in_facts(broken.facts) + len(broken.quarantine)
    expected = _units(clean)
    expected[6] = "malformed_row"
    assert _units(broken) == expected  # every other line ends exactly where it did
    row = broken.quarantine.set_index("key").loc["line 6"]
    assert "quot" in row["detail"] and len(row["raw"]) < 200
    assert set(broken.facts["img_id"]) == set(clean.facts["img_id"])


def test_real_file_quirks_still_parse(tmp_path, catalog):
    """A byte-order mark, CRLF line ends, blank lines and a quoted field holding a comma."""
    path = tmp_path / "meta.csv"
    path.write_bytes("\ufeffsource,question,answer,img_id\r\n"
                     "Polyps,Is there text?,yes,img1\r\n"
                     "\r\n"
                     '"Polyps",How many polyps are in the image?,"1",img1\r\n'
                     '"Polyps, two",Is there text?,no,img2\r\n'.encode())
    parsed = _parse(path, catalog)
    assert parsed.rows_read == 3 and len(parsed.quarantine) == 0
    assert set(zip(parsed.facts["img_id"], parsed.facts["source_label"])) == {("img1", "Polyps"),
                                                                               ("img2", "Polyps, two")}
    assert sorted(ln for rows in parsed.facts["source_rows"] for ln in rows) == [2, 4, 5]


@pytest.mark.parametrize("img_id", ["../../../../etc/passwd", "..", ".hidden", "/abs/path", "a/b", "a\\b",
                                    "x" * 201, "sp ace", ""])
def test_ids_that_would_be_paths_are_quarantined_as_bad_id(tmp_path, catalog, img_id):
    path = tmp_path / "meta.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["source", "question", "answer", "img_id"])
        w.writerow(["Polyps", "Is there text?", "yes", "img1"])
        w.writerow(["Polyps", "Is there text?", "yes", img_id])
    parsed = _parse(path, catalog)
    assert parsed.rows_read == 2 == units_in_facts(parsed.facts) + len(parsed.quarantine)
    assert list(parsed.quarantine["reason"]) == ["bad_id"] and list(parsed.facts["img_id"]) == ["img1"]


def test_the_id_rule():
    for good in ["cl8k2u1r71foz083278j63qnm", "000e3fee-7f5c-4819-9f9c-4c983b68888a", "a.b_c-d", "a..b", "x" * 200]:
        assert bad_id(good) is None, good
    for bad in ["..", ".", "", "../x", "/x", "x/", "a\x00b", "abc\n", "x" * 201, "é", None, 7]:
        assert bad_id(bad), bad


def test_a_non_utf8_byte_quarantines_only_its_row(tmp_path, catalog):
    path = tmp_path / "meta.csv"
    path.write_bytes(b"source,question,answer,img_id\n"
                     b"Polyps,Is there text?,yes,img1\n"
                     b"Polyps,Is there text?,yes,img\xe92\n"
                     b"Polyps,How many polyps are in the image?,1,img1\n")
    parsed = _parse(path, catalog)
    assert parsed.rows_read == 3 == units_in_facts(parsed.facts) + len(parsed.quarantine)
    q = parsed.quarantine.iloc[0]
    assert (q["key"], q["reason"]) == ("line 3", "malformed_row") and "0xe9" in q["detail"]
    assert len(parsed.facts) == 2


BIG = "x" * 5_000_000


@pytest.mark.parametrize("content, line, words", [
    (b"", None, "empty file"),
    (b"\n\n  \n", None, "empty file"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00", 1, "header: not UTF-8"),
    (b"\x00\x00\x00\x18ftypmp42", 1, "binary file"),
    (b"a,b,c\n1,2,3\n", 1, "lacks ['source', 'question', 'answer', 'img_id']"),
    (b"\xff\xfes\x00o\x00u\x00r\x00", 1, "UTF-16 text"),
    (b"sourc\xe9,question,answer,img_id\n", 1, "header: not UTF-8 text: byte 0xe9 at column 6"),
    (b"source,question,answer,img_id\n", None, "no rows after the header"),
    (("source,question,answer,img_id\nPolyps,Is there text?,yes,img1\nPolyps,Is there text?,"
      + BIG + ",img1\n").encode(), 3, "longer than a label row"),
    (b"source,question,answer,img_id\nPolyps,Is there text?,yes,img1\n"
     b'"Polyps,Is there text?,yes,img1\n"Polyps,x\n', 3, "2 of 3 lines cannot be split"),
])
def test_unreadable_label_files_are_one_line_errors(tmp_path, catalog, content, line, words):
    path = tmp_path / "meta.csv"
    path.write_bytes(content)
    with pytest.raises(LabelFileError) as err:
        _parse(path, catalog)
    message = str(err.value)
    where = f"{path}:{line}: " if line else f"{path}: "
    assert message.startswith(where) and words in message and "\n" not in message and len(message) < 400


def test_a_missing_label_file_or_a_folder_is_a_label_file_error(tmp_path, catalog):
    for path, words in [(tmp_path / "nope.csv", "not found"), (tmp_path, "is a folder")]:
        with pytest.raises(LabelFileError, match=words):
            _parse(path, catalog)
