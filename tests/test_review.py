"""Expert review round trip: stratified export, sheet validation, import that removes exactly the wrong rows."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from conftest import run_cli, tree_digests

from review import (current_verdicts, error_rates, expert_rejected, load_verdicts, read_filled_sheet, reviewable_rows,
                    row_digests, stratified_sample, wilson_interval)
from review.verdicts import ReviewSheetError


def test_wilson_interval_known_values():
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def _rows(n_per_cell: dict[tuple[str, int], int]) -> pd.DataFrame:
    rows = [{"qa_id": f"{c}-{k}-{i}", "question_class": [c], "complexity": k}
            for (c, k), n in n_per_cell.items() for i in range(n)]
    return pd.DataFrame(rows)


def test_sample_is_stratified_by_class_and_complexity_and_deterministic_per_seed():
    cells = {("common", 1): 500, ("common", 2): 300, ("rare", 1): 4, ("rare", 3): 2, ("mid", 2): 40}
    rows = _rows(cells)
    sample = stratified_sample(rows, 20, seed=7)
    got = Counter((r.question_class[0], r.complexity) for r in sample.itertuples())
    assert len(sample) == 20 and sample["qa_id"].is_unique
    # every cell is covered; the small cells give all they have, the rest share the remainder evenly
    assert got[("rare", 3)] == 2 and got[("rare", 1)] == 4
    assert {got[("common", 1)], got[("common", 2)], got[("mid", 2)]} <= {4, 5}
    shuffled = rows.sample(frac=1, random_state=3)
    assert stratified_sample(shuffled, 20, seed=7)["qa_id"].tolist() == sample["qa_id"].tolist()
    assert stratified_sample(rows, 20, seed=8)["qa_id"].tolist() != sample["qa_id"].tolist()
    assert len(stratified_sample(rows, 10_000, seed=7)) == len(rows)


def test_a_multi_class_row_counts_for_each_of_its_cells():
    rows = pd.DataFrame([{"qa_id": "ab", "question_class": ["a", "b"], "complexity": 2},
                         *[{"qa_id": f"a{i}", "question_class": ["a"], "complexity": 2} for i in range(5)],
                         *[{"qa_id": f"b{i}", "question_class": ["b"], "complexity": 2} for i in range(5)]])
    sample = stratified_sample(rows, 6, seed=1)
    counts = Counter(c for cl in sample["question_class"] for c in cl)
    assert abs(counts["a"] - counts["b"]) <= 1 and counts["a"] + counts["b"] >= 6


def _sheet(path: Path, lines: list[list[str]]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["review_id", "question", "verdict", "comment"])
        w.writerows(lines)
    return path


def test_a_malformed_sheet_is_rejected_with_every_line_named(tmp_path):
    sheet = _sheet(tmp_path / "s.csv", [["q1", "x", "ok", ""], ["q9", "x", "wrong", ""], ["q2", "x", "wrng", ""],
                                        ["q1", "x", "ok", ""], ["q3", "x", "", ""]])
    with pytest.raises(ReviewSheetError) as err:
        read_filled_sheet(sheet, {"q1": "d1", "q2": "d2", "q3": "d3"})
    text = str(err.value)
    assert f"{sheet}:3: unknown review_id 'q9'" in text
    assert f"{sheet}:4: verdict 'wrng' is not one of ok, wrong, unclear" in text
    assert f"{sheet}:5: review_id 'q1' already on line 2" in text
    assert "\n" not in text and "nothing was applied" in text
    good = _sheet(tmp_path / "g.csv", [["q1", "x", " OK ", ""], ["q2", "x", "wrong", "no polyp"], ["q3", "x", "", ""]])
    verdicts = read_filled_sheet(good, {"q1": "d1", "q2": "d2", "q3": "d3"})
    # A sheet without `row_digest` (exported before it existed) gets the rows' current digests.
    assert verdicts[["qa_id", "verdict", "comment", "line", "row_digest"]].values.tolist() == [
        ["q1", "ok", "", 2, "d1"], ["q2", "wrong", "no polyp", 3, "d2"]]
    with pytest.raises(ReviewSheetError, match=r"s2.csv:1: header lacks \['verdict'\]"):
        (tmp_path / "s2.csv").write_text("review_id,comment\nq1,x\n")
        read_filled_sheet(tmp_path / "s2.csv", {"q1": "d1"})


def _judged_rows(answers: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    qa = pd.DataFrame({"qa_id": ["1", "2", "3", "4"], "question_class": [["a"], ["a", "b"], ["b"], ["b"]],
                       "source": "kvasir_vqa", "img_id": ["i1", "i2", "i3", "i4"],
                       "question": ["Is there a polyp?"] * 4, "answer": answers})
    images = pd.DataFrame({"source": "kvasir_vqa", "img_id": ["i1", "i2", "i3", "i4"], "sha256": ["s1", "s2", "s3", "s4"]})
    return qa, images


def test_error_rates_per_class_with_wilson_intervals():
    qa, images = _judged_rows(["yes", "no", "yes", "no"])
    digests = row_digests(qa, images)
    verdicts = pd.DataFrame({"qa_id": ["1", "2", "3", "4"], "verdict": ["wrong", "ok", "unclear", "ok"],
                             "row_digest": [digests[q] for q in "1234"]})
    rates = {r["question_class"]: r for r in error_rates(verdicts, qa, images)}
    assert (rates["all classes"]["wrong"], rates["all classes"]["ok"], rates["all classes"]["unclear"]) == (1, 2, 1)
    assert rates["a"]["error_rate"] == 0.5 and rates["b"]["error_rate"] == 0.0 and rates["b"]["unclear"] == 1
    assert (rates["a"]["ci_low"], rates["a"]["ci_high"]) == pytest.approx(wilson_interval(1, 2), abs=1e-4)
    assert rates["all classes"]["void"] == 0


def test_a_verdict_on_a_row_that_changed_is_void(capped_run, tmp_path):
    """A row id names a plan, not a text: after a label fix or a backend switch the same id holds another answer
    (or its image other bytes). An old `wrong` verdict must not remove the new row, an old `ok` must not count
    in the error rate, and the row is offered again for review."""
    qa, splits, images = (pd.read_parquet(capped_run / f"stages/{t}.parquet") for t in ("qa_dedup", "splits", "images"))
    offered = reviewable_rows(qa, splits, images)
    judged = offered.drop_duplicates(["source", "img_id"]).head(6)  # six images: a changed image voids one
    verdicts = pd.DataFrame({"qa_id": judged["qa_id"], "verdict": ["wrong", "wrong", "ok", "ok", "ok", "ok"],
                             "comment": "", "sheet": "s.csv", "line": range(2, 8), "row_digest": judged["row_digest"]})
    assert set(offered["qa_id"]) - set(reviewable_rows(qa, splits, images, verdicts)["qa_id"]) == set(judged["qa_id"])
    changed_answer, changed_ok, moved_image = judged["qa_id"].iloc[0], judged["qa_id"].iloc[2], judged.iloc[3]
    relabelled = qa.assign(answer=qa["answer"].where(~qa["qa_id"].isin([changed_answer, changed_ok]), "Something else."))
    rebytes = images.assign(sha256=images["sha256"].where(
        ~((images["source"] == moved_image["source"]) & (images["img_id"] == moved_image["img_id"])), "0" * 64))
    valid, void = current_verdicts(verdicts, relabelled, rebytes)
    assert set(void["qa_id"]) == {changed_answer, changed_ok, moved_image["qa_id"]}
    kept, quarantined = expert_rejected(relabelled, verdicts, rebytes)
    assert changed_answer in set(kept["qa_id"]) and list(quarantined["key"]) == [judged["qa_id"].iloc[1]]
    rates = error_rates(verdicts, relabelled, rebytes)[0]
    assert rates["void"] == 3 and rates["reviewed"] == len(valid) == 3 and rates["wrong"] == 1
    again = set(reviewable_rows(relabelled, splits, rebytes, verdicts)["qa_id"])
    assert set(void["qa_id"]) <= again and not set(valid["qa_id"]) & again
    # Verdicts recorded before digests were kept: what was read is unknown, so they are void.
    legacy = verdicts.drop(columns="row_digest")
    (tmp_path / "review").mkdir()
    legacy.to_parquet(tmp_path / "review" / "verdicts.parquet")
    assert len(current_verdicts(load_verdicts(tmp_path), qa, images)[1]) == 6


def _export(run: Path, n: int, seed: int) -> Path:
    run_cli("review", "export", "--run", str(run), "--n", str(n), "--seed", str(seed))
    return run / "review" / f"sheet-n{n}-seed{seed}"


def test_review_round_trip(capped_run):
    """Export is stratified and deterministic; a malformed sheet changes nothing; the planted sheet removes
    exactly its `wrong` rows, every other release row byte-identical, and card and report show the rates."""
    from publish.release import release_row_digests

    run = capped_run
    first = _export(run, 40, 3)
    digests = tree_digests(first)
    assert digests == tree_digests(_export(run, 40, 3))  # same seed, same bytes
    assert {"sheet.csv", "sheet.html", "label-studio.json", "label-studio.xml"} <= set(digests)
    rows = list(csv.DictReader((first / "sheet.csv").open()))
    assert len(rows) == 40 and all(r["verdict"] == "" and r["comment"] == "" for r in rows)
    assert all(len(r["row_digest"]) == 32 for r in rows)
    explained = pd.read_parquet(run / "stages/explanations.parquet").set_index("qa_id")["explanation"]
    assert all(r["explanation"] == explained[r["review_id"]] for r in rows)  # the sheet shows each explanation
    assert all(f'<img src="{r["image"]}"' in (first / "sheet.html").read_text() for r in rows)
    assert all((first / r["image"]).is_file() for r in rows)
    assert len(json.loads((first / "label-studio.json").read_text())) == 40
    cells = Counter((c, r["complexity"]) for r in rows for c in r["question_class"].split("; "))
    released = reviewable_rows(*(pd.read_parquet(run / f"stages/{t}.parquet") for t in ("qa_dedup", "splits", "images")))
    all_cells = {(c, str(k)) for cl, k in zip(released["question_class"], released["complexity"]) for c in cl}
    assert len(all_cells) > 40 and set(cells) == all_cells  # 40 rows of several classes cover every cell
    other = [r["review_id"] for r in csv.DictReader((_export(run, 40, 4) / "sheet.csv").open())]
    assert other != [r["review_id"] for r in rows]

    before = release_row_digests(run / "release")
    release_before = tree_digests(run / "release")
    wrong = [r["review_id"] for r in rows[:4]]
    for i, r in enumerate(rows[:10]):
        r["verdict"], r["comment"] = ("wrong", "answer contradicts the image") if i < 4 else ("ok", "")
    rows[10]["verdict"] = "unclear"
    rows[11]["verdict"], rows[11]["row_digest"] = "ok", "0" * 32  # the row read is not the row now: void
    bad = [dict(r) for r in rows]
    bad[12]["verdict"] = "wrongg"
    bad_path = first.parent / "bad.csv"
    for path, data in ((bad_path, bad), (first.parent / "filled.csv", rows)):
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(data)
    proc = run_cli("review", "import", "--run", str(run), str(bad_path), check=False)
    assert proc.returncode == 2 and f"{bad_path}:14: verdict 'wrongg'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (run / "review/verdicts.parquet").exists() and tree_digests(run / "release") == release_before

    proc = run_cli("review", "import", "--run", str(run), str(first.parent / "filled.csv"))
    assert "4 wrong" in proc.stdout and "quality report" in proc.stdout
    after = release_row_digests(run / "release")
    assert set(before) - set(after) == set(wrong) and set(after) <= set(before)
    assert all(after[q] == before[q] for q in after)  # every other row byte-identical
    explanations = {q for s in (run / "release/explanations").glob("*.parquet")
                    for q in pd.read_parquet(s, columns=["qa_id"])["qa_id"]}
    assert explanations and not explanations & set(wrong)  # gone from the `explanations` config too
    quarantine = pd.read_parquet(run / "quarantine.parquet")
    rejected = quarantine[quarantine["reason"] == "expert_rejected"]
    assert sorted(rejected["key"]) == sorted(wrong) and set(rejected["stage"]) == {"review"}
    verdicts = pd.read_parquet(run / "review/verdicts.parquet")
    assert Counter(verdicts["verdict"]) == {"wrong": 4, "ok": 7, "unclear": 1}
    card = (run / "release/README.md").read_text()
    assert "## Expert review" in card and "| all classes | 11 | 6 | 4 | 1 | 40.0 % |" in card
    assert "offered for review again): 1." in card
    assert rows[11]["review_id"] in {r["review_id"] for r in csv.DictReader((_export(run, 100000, 5) / "sheet.csv").open())}
    page = (run / "report.html").read_text()
    assert "40.0 %" in page and "report_files/review.png" in page
    swift = sum(len((run / f"export/swift/original-{s}.jsonl").read_text().splitlines()) for s in ("train", "test"))
    assert swift == len(after) == len(before) - 4  # the ms-swift export leaves them out too
