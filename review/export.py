"""The review sheet: a sample of release rows stratified by question class x complexity, written so a
clinician can judge it without Python.

Files (in `<run>/review/<n>-seed<seed>/`):

| file | what |
|---|---|
| `sheet.html` | one block per row: the image, question, answer, the atomic labels it came from, the explanation when the release has one, and the row's `review_id` |
| `sheet.csv` | `SHEET_COLUMNS`; fill `verdict` (`ok` / `wrong` / `unclear`, blank = not reviewed) and `comment`, then `kvqa review import` it |
| `label-studio.json`, `label-studio.xml` | the same rows as Label Studio import tasks and a labelling config with the verdict choices and a comment box |
| `images/` | the sampled rows' image files, named `<source>__<img_id><ext>` |

Sampling. A row counts for each (class, complexity) cell of its classes. Rows are ordered by a hash of
(seed, row id); the sample takes, one row at a time, the next row of the cell with the fewest sampled rows
so far (ties broken by a hash of (seed, cell)). Every cell is covered before any gets a second row, so a
rare class gets as many reviewed rows as a common one: what a per-class error rate needs. The same rows
and seed give the same sample and the same bytes.
"""

from __future__ import annotations

import csv
import html
import io
import json
import shutil
from pathlib import Path

import pandas as pd

from kvqa.tables import atomic_path, stable_hash, write_json, write_text
from publish.release import release_rows
from review.verdicts import current_verdicts, row_digests

SHEET_COLUMNS = ["review_id", "img_id", "source", "complexity", "question_class", "question", "answer",
                 "atomic_labels", "explanation", "image", "row_digest", "verdict", "comment"]
LABEL_STUDIO_CONFIG = """<View>
  <Image name="image" value="$image" maxWidth="640px"/>
  <Header value="$question"/>
  <Text name="answer" value="$answer"/>
  <Text name="atomic_labels" value="$atomic_labels"/>
  <Text name="explanation" value="$explanation"/>
  <Choices name="verdict" toName="answer" choice="single" required="true">
    <Choice value="ok"/>
    <Choice value="wrong"/>
    <Choice value="unclear"/>
  </Choices>
  <TextArea name="comment" toName="answer" rows="2"/>
</View>
"""


def reviewable_rows(qa: pd.DataFrame, splits: pd.DataFrame, images: pd.DataFrame,
                    verdicts: pd.DataFrame | None = None) -> pd.DataFrame:
    """The rows of the release (as the release stage selects them) that have no current verdict (a void one,
    on a row changed since, does not count: the row is offered again), with their `row_digest`."""
    rows = release_rows(qa, splits, images)
    if verdicts is not None and len(verdicts):
        judged, _ = current_verdicts(verdicts, qa, images)
        rows = rows[~rows["qa_id"].isin(set(judged["qa_id"]))]
    digests = row_digests(qa, images)
    return rows.assign(row_digest=[digests[q] for q in rows["qa_id"]]).reset_index(drop=True)


def _cells(row) -> list[tuple[str, int]]:
    return [(str(c), int(row.complexity)) for c in row.question_class]


def stratified_sample(rows: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """`n` rows (fewer if the release has fewer), balanced over (class, complexity) cells; column
    `stratum` names the cell each row was drawn for. Deterministic in (rows, n, seed), not in row order."""
    ordered = rows.assign(_draw=[stable_hash(seed, "review", q) for q in rows["qa_id"]]).sort_values("_draw")
    by_cell: dict[tuple[str, int], list[int]] = {}
    for pos, row in enumerate(ordered.itertuples(index=False)):
        for cell in _cells(row):
            by_cell.setdefault(cell, []).append(pos)
    cell_key = {cell: stable_hash(seed, "cell", *cell) for cell in by_cell}
    counts = dict.fromkeys(by_cell, 0)
    cursor = dict.fromkeys(by_cell, 0)
    taken: list[tuple[int, tuple[str, int]]] = []
    used: set[int] = set()
    cells_of = [_cells(r) for r in ordered.itertuples(index=False)]
    while len(taken) < n:
        for cell, members in by_cell.items():  # skip rows already taken for another cell
            while cursor[cell] < len(members) and members[cursor[cell]] in used:
                cursor[cell] += 1
        open_cells = [c for c, members in by_cell.items() if cursor[c] < len(members)]
        if not open_cells:
            break
        cell = min(open_cells, key=lambda c: (counts[c], cell_key[c]))
        pos = by_cell[cell][cursor[cell]]
        used.add(pos)
        taken.append((pos, cell))
        for other in cells_of[pos]:
            counts[other] += 1
    sample = ordered.iloc[[pos for pos, _ in taken]].drop(columns="_draw").copy()
    sample["stratum"] = [f"{c}/level {k}" for _, (c, k) in taken]
    return sample.reset_index(drop=True)


def _atomic_labels(original: str) -> str:
    """`original` (JSON list of {"q", "a"}) as `question -> answer` lines a reader can check."""
    return "\n".join(f"{p['q']} -> {p['a']}" for p in json.loads(original))


def _sheet_rows(sample: pd.DataFrame) -> list[dict]:
    out = []
    for r in sample.itertuples(index=False):
        row = r._asdict()
        out.append({"review_id": r.qa_id, "img_id": r.img_id, "source": r.source, "complexity": int(r.complexity),
                    "question_class": "; ".join(r.question_class), "question": r.question, "answer": r.answer,
                    "atomic_labels": _atomic_labels(r.original), "explanation": str(row.get("explanation") or ""),
                    "image": f"images/{r.source}__{r.img_id}{Path(r.path).suffix.lower()}",
                    "row_digest": r.row_digest, "verdict": "", "comment": ""})
    return out


def _csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SHEET_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:  # one physical line per row: `file:line` errors point at the row a person edits
        writer.writerow({k: str(v).replace("\n", " | ") for k, v in row.items()})
    return buf.getvalue()


def _html_page(rows: list[dict], title: str) -> str:
    e = html.escape
    blocks = []
    for i, r in enumerate(rows, 1):
        labels = "".join(f"<li>{e(line)}</li>" for line in r["atomic_labels"].split("\n"))
        explanation = f"<p><b>Explanation:</b> {e(r['explanation'])}</p>" if r["explanation"] else ""
        blocks.append(
            f'<section class="row" id="{e(r["review_id"])}"><img src="{e(r["image"])}" alt="image {e(r["img_id"])}">'
            f'<div><p class="id">{i}. review_id <code>{e(r["review_id"])}</code> &middot; level {r["complexity"]} '
            f'&middot; {e(r["question_class"])}</p><p><b>Question:</b> {e(r["question"])}</p>'
            f'<p><b>Answer:</b> {e(r["answer"])}</p>{explanation}'
            f'<p><b>Atomic labels it was built from:</b></p><ul>{labels}</ul>'
            f'<p class="verdict">Verdict: ok / wrong / unclear &mdash; comment:</p></div></section>')
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{e(title)}</title><style>"
            "body{font-family:sans-serif;max-width:1100px;margin:1em auto}"
            ".row{display:flex;gap:1em;border-top:1px solid #ccc;padding:.8em 0;page-break-inside:avoid}"
            ".row img{width:320px;height:auto;object-fit:contain}.id{color:#555}.verdict{color:#888}"
            f"</style></head><body><h1>{e(title)}</h1>"
            "<p>For each row, judge whether the answer is a correct answer to the question for this image, given "
            "the atomic labels it was built from. Write the verdict (<b>ok</b>, <b>wrong</b> or <b>unclear</b>) and "
            "an optional comment in the <code>verdict</code> and <code>comment</code> columns of "
            "<code>sheet.csv</code> (same rows, same order), keep the <code>review_id</code> column as it is, "
            "and return the file. A blank verdict means not reviewed.</p>"
            + "\n".join(blocks) + "</body></html>\n")


def write_review_sheet(sample: pd.DataFrame, out_dir: Path, title: str) -> dict[str, int]:
    """Write the sheet's files into `out_dir` (replacing what was there); returns {file: rows or bytes}."""
    out_dir = Path(out_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    rows = _sheet_rows(sample)
    for r, path in zip(rows, sample["path"]):
        with atomic_path(out_dir / r["image"]) as tmp:
            shutil.copyfile(path, tmp)
    write_text(_csv_text(rows), out_dir / "sheet.csv")
    write_text(_html_page(rows, title), out_dir / "sheet.html")
    tasks = [{"id": i, "data": {k: v for k, v in r.items() if k not in ("verdict", "comment")}}
             for i, r in enumerate(rows, 1)]
    write_json(tasks, out_dir / "label-studio.json")
    write_text(LABEL_STUDIO_CONFIG, out_dir / "label-studio.xml")
    return {"sheet.csv": len(rows), "sheet.html": len(rows), "label-studio.json": len(tasks),
            "images": len({r["image"] for r in rows})}
