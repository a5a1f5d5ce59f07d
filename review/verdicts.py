"""Verdicts from a filled review sheet: validated, recorded in the run, applied to the release.

A sheet is applied whole or not at all: `read_filled_sheet` collects every problem (unknown ids, bad
verdicts, repeated ids, a missing column) as `file:line: what` and raises one `ReviewSheetError` (a
`BadInput`: exit 2) before anything is written. A blank verdict means "not reviewed" and is skipped.

`<run>/review/verdicts.parquet` (columns `VERDICT_COLUMNS`) holds every recorded verdict, one per row id;
a later sheet overrides an earlier verdict for the same id. The release stage reads it as an input, so
recording verdicts changes the release's cache key and `wrong` rows leave the release as quarantine rows
(`review/expert_rejected`); nothing else in the release moves.

A row id names a plan (source, image, level, classes), not a text: after a label fix or a backend switch the
same id holds another question or answer. So each verdict keeps the digest of what the reviewer read
(`row_digest`: question, answer and the image's sha256; the sheet carries it from `kvqa review export`), and
a verdict whose row no longer has that digest (or is gone) is **void** (`current_verdicts`): it removes no
row, counts in no error rate, is counted as void in the card, and its row is offered again by the next export.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from kvqa.errors import BadInput
from kvqa.tables import quarantine_frame, read_table, write_table

VERDICTS = ("ok", "wrong", "unclear")
VERDICTS_FILE = "review/verdicts.parquet"
VERDICT_COLUMNS = ["qa_id", "verdict", "comment", "sheet", "line", "row_digest"]
Z_95 = 1.959963984540054  # two-sided 95 % normal quantile
MAX_LISTED_PROBLEMS = 5


class ReviewSheetError(BadInput):
    """A filled review sheet that cannot be applied; the message lists `file:line: what` problems."""


def load_verdicts(run_dir: Path) -> pd.DataFrame:
    """The run's recorded verdicts (empty, with the columns, when none were imported). Verdicts recorded
    before digests were kept get an empty `row_digest`: what their reviewer read is unknown, so they are void."""
    path = Path(run_dir) / VERDICTS_FILE
    if not path.is_file():
        return pd.DataFrame({c: pd.Series(dtype="int64" if c == "line" else "object") for c in VERDICT_COLUMNS})
    recorded = read_table(path)
    return recorded if "row_digest" in recorded else recorded.assign(row_digest="")


def record_verdicts(run_dir: Path, verdicts: pd.DataFrame) -> None:
    """Record `verdicts` (every verdict the run has, `merge_verdicts`) as the run's input to the stages that
    leave `wrong` rows out."""
    write_table(verdicts, Path(run_dir) / VERDICTS_FILE)


def row_digests(qa: pd.DataFrame, images: pd.DataFrame) -> dict[str, str]:
    """qa_id -> digest of what a reviewer reads of the row: its question, its answer and its image's sha256."""
    sha = dict(zip(zip(images["source"], images["img_id"]), images["sha256"]))
    return {r.qa_id: hashlib.sha256(json.dumps([r.question, r.answer, sha.get((r.source, r.img_id), "")])
                                    .encode()).hexdigest()[:32]
            for r in qa[["qa_id", "source", "img_id", "question", "answer"]].itertuples(index=False)}


def current_verdicts(verdicts: pd.DataFrame, qa: pd.DataFrame, images: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(verdicts on rows that still read as the reviewer read them, void verdicts): a row whose question,
    answer or image changed since its verdict, or that is gone, voids it."""
    digests = row_digests(qa, images)
    valid = np.array([bool(d) and digests.get(q) == d for q, d in zip(verdicts["qa_id"], verdicts["row_digest"])],
                     dtype=bool)
    return verdicts[valid], verdicts[~valid]


def read_filled_sheet(path: Path, known: dict[str, str]) -> pd.DataFrame:
    """The reviewed rows of a filled sheet (`VERDICT_COLUMNS`), or ReviewSheetError naming every problem.

    `known` maps the run's reviewable row ids to their current `row_digests`: any other id is a typo or a
    sheet of another run, and applying the rest would silently lose a verdict. A verdict keeps the sheet's
    `row_digest` (what the reviewer read; void if the row changed since the export); a sheet without that
    column (exported before it existed) gets the row's current digest. Verdicts are case- and
    space-insensitive.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # spreadsheets often save a BOM
    except FileNotFoundError:
        raise ReviewSheetError(f"{path}: not found") from None
    except IsADirectoryError:
        raise ReviewSheetError(f"{path}: is a folder, not a review sheet CSV") from None
    except UnicodeDecodeError as err:
        raise ReviewSheetError(f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x}); save the sheet "
                               "as CSV UTF-8") from None
    problems: list[str] = []
    rows: list[dict] = []
    reader = csv.reader(text.splitlines(keepends=True))
    try:
        header = next(reader, None)
        if header is None:
            raise ReviewSheetError(f"{path}:1: empty file, expected the review sheet's header")
        header = [h.strip() for h in header]
        missing = [c for c in ("review_id", "verdict") if c not in header]
        if missing:
            raise ReviewSheetError(f"{path}:1: header lacks {missing} (columns of `kvqa review export`'s sheet.csv)")
        col = {name: header.index(name) for name in ("review_id", "verdict", "comment", "row_digest") if name in header}
        seen: dict[str, int] = {}
        line = reader.line_num
        for record in reader:
            start, line = line + 1, reader.line_num
            if not any(field.strip() for field in record):
                continue
            if len(record) != len(header):
                problems.append(f"{path}:{start}: {len(record)} fields, the header has {len(header)}")
                continue
            review_id = record[col["review_id"]].strip()
            verdict = record[col["verdict"]].strip().lower()
            if review_id not in known:
                problems.append(f"{path}:{start}: unknown review_id {review_id!r} (not a row of this run's release)")
            elif review_id in seen:
                problems.append(f"{path}:{start}: review_id {review_id!r} already on line {seen[review_id]}")
            if verdict and verdict not in VERDICTS:
                problems.append(f"{path}:{start}: verdict {record[col['verdict']].strip()!r} is not one of "
                                f"{', '.join(VERDICTS)} (or blank: not reviewed)")
            seen.setdefault(review_id, start)
            if verdict:
                rows.append({"qa_id": review_id, "verdict": verdict,
                             "comment": record[col["comment"]].strip() if "comment" in col else "",
                             "sheet": path.name, "line": start,
                             "row_digest": record[col["row_digest"]].strip() if "row_digest" in col
                             else known.get(review_id, "")})
    except csv.Error as err:
        raise ReviewSheetError(f"{path}:{reader.line_num}: not a CSV sheet ({err})") from None
    if problems:
        more = f" (and {len(problems) - MAX_LISTED_PROBLEMS} more)" if len(problems) > MAX_LISTED_PROBLEMS else ""
        raise ReviewSheetError("; ".join(problems[:MAX_LISTED_PROBLEMS]) + more + "; nothing was applied")
    return pd.DataFrame(rows, columns=VERDICT_COLUMNS).astype({"line": "int64"})


def merge_verdicts(recorded: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    """Recorded verdicts with `new` ones on top (a later sheet overrides an id's earlier verdict), by id."""
    kept = recorded[~recorded["qa_id"].isin(new["qa_id"])]
    merged = pd.concat([kept, new], ignore_index=True) if len(kept) else new.copy()
    return merged[VERDICT_COLUMNS].sort_values("qa_id", kind="stable").reset_index(drop=True)


def expert_rejected(qa: pd.DataFrame, verdicts: pd.DataFrame, images: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(QA rows without those judged `wrong` by a current verdict (`current_verdicts`), quarantine rows
    `review/expert_rejected` for the removed ones, the reviewer's comment as detail and the judged question and
    answer as raw input)."""
    valid, _ = current_verdicts(verdicts, qa, images)
    wrong = valid[valid["verdict"] == "wrong"]
    comments = dict(zip(wrong["qa_id"], wrong["comment"]))
    mask = qa["qa_id"].isin(comments)
    quarantine = quarantine_frame([
        {"stage": "review", "source": r.source, "key": r.qa_id, "reason": "expert_rejected",
         "detail": comments[r.qa_id] or "judged wrong by the reviewer",
         "raw": json.dumps({"img_id": r.img_id, "question": r.question, "answer": r.answer}, sort_keys=True)}
        for r in qa[mask].itertuples(index=False)])
    return qa[~mask], quarantine


def wilson_interval(wrong: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a proportion wrong/n: unlike the normal interval it stays inside
    [0, 1] and is not empty at 0 or n errors, which is what a small expert sample mostly shows."""
    if n <= 0:
        return 0.0, 1.0
    p = wrong / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def error_rates(verdicts: pd.DataFrame, qa: pd.DataFrame, images: pd.DataFrame) -> list[dict]:
    """Per question class (a row counts for each class it holds) and over all reviewed rows: rows judged,
    wrong, unclear, the sampled error rate wrong / (ok + wrong) and its 95 % Wilson interval. `unclear`
    verdicts are counted but not in the rate: they say nothing about the row being right or wrong. Only
    current verdicts count (`current_verdicts`); the "all classes" row gives the void ones as `void`."""
    if not len(verdicts):
        return []
    verdicts, void = current_verdicts(verdicts, qa, images)
    judged = verdicts[["qa_id", "verdict"]].merge(qa[["qa_id", "question_class"]], on="qa_id", how="inner")
    groups = [("all classes", judged)]
    exploded = judged.explode("question_class")
    groups += [(c, g) for c, g in sorted(exploded.groupby("question_class"), key=lambda kv: kv[0])]
    out = []
    for name, g in groups:
        wrong, ok = int((g["verdict"] == "wrong").sum()), int((g["verdict"] == "ok").sum())
        low, high = wilson_interval(wrong, wrong + ok)
        out.append({"question_class": name, "reviewed": len(g), "ok": ok, "wrong": wrong,
                    "unclear": int((g["verdict"] == "unclear").sum()),
                    "error_rate": round(wrong / (wrong + ok), 4) if wrong + ok else None,
                    "ci_low": round(low, 4), "ci_high": round(high, 4)})
    out[0]["void"] = len(void)
    return out
