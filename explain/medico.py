"""Medico 2026 subtask 2 on our release: the validation subset, a reference submission, a submission checker.

The task page builds the validation subset from the release's `test` split with `datasets`:

    ds.filter(lambda x: x["complexity"] == 1).shuffle(seed=42).select(range(1500))
      .add_column("val_id", list(range(1500))).remove_columns([...]).cast_column("image", HfImage())

`validation_subset` runs exactly those operations on our release folder (`load_dataset(folder)["test"]`),
taking the first min(1500, rows) rows, and also drops our extra columns (provenance, `boxes`), so the subset
has the page's columns `val_id, img_id, image, question`. It keeps the `qa_id` of each val row aside: that
is how the reference submission finds the row's answer, explanation and regions in the release.

A submission is JSONL, one object per `val_id`: `val_id, img_id, question, answer, textual_explanation,
visual_explanation [{type, data, description}], confidence_score`. `data` is `[[x1, y1, x2, y2]]` for a
bounding box, else a path relative to the submission's folder (`visuals/...`). `submission_problems` checks
a file against the page's field rules and reports each problem as `file:line: what`.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path, PurePosixPath, PureWindowsPath

import pandas as pd
import pyarrow.parquet as pq

from kvqa.errors import BadInput, read_user_text
from kvqa.tables import atomic_path, write_text

VAL_SIZE = 1500
VAL_SEED = 42
VAL_COLUMNS = ["val_id", "img_id", "image", "question"]
PAGE_REMOVED = ["complexity", "answer", "original", "question_class"]  # what the page's snippet removes
REQUIRED = {"val_id": int, "img_id": str, "question": str, "answer": str, "textual_explanation": str}
OPTIONAL = {"visual_explanation", "confidence_score"}
SUBMISSION_NAME = "submission_task2.jsonl"
VAL_SET_NAME = "val_set_task2"


def validation_subset(release_dir: Path, cache_dir: Path, size: int = VAL_SIZE):
    """(val_set_task2 as the page builds it, on our release folder; the qa_id of each val row, in val_id
    order). `cache_dir` should be fresh: `datasets` may serve a rebuilt folder from an older cache."""
    from datasets import Image as HfImage
    from datasets import load_dataset

    ds = load_dataset(str(release_dir), cache_dir=str(cache_dir))["test"]
    chosen = ds.filter(lambda x: x["complexity"] == 1).shuffle(seed=VAL_SEED)
    n = min(size, len(chosen))
    chosen = chosen.select(range(n))
    qa_ids = list(chosen["qa_id"])
    extra = [c for c in chosen.column_names if c not in VAL_COLUMNS and c not in PAGE_REMOVED]
    val = (chosen.add_column("val_id", list(range(n)))
           .remove_columns(PAGE_REMOVED + extra)
           .cast_column("image", HfImage()))
    return val.select_columns(VAL_COLUMNS), qa_ids


def _release_table(release_dir: Path, folder: str, columns: list[str]) -> pd.DataFrame:
    files = sorted((Path(release_dir) / folder).glob("*.parquet"))
    if not files:
        raise BadInput(f"{Path(release_dir) / folder}: no parquet shards (build the run with explain enabled)")
    return pd.concat([pq.read_table(f, columns=columns).to_pandas() for f in files], ignore_index=True)


def reference_lines(release_dir: Path, qa_ids: list[str], out_dir: Path) -> list[dict]:
    """The reference submission's objects, one per val row: answer and explanation from the release's
    `explanations` config, its source boxes, its Kvasir-SEG mask written to `out_dir/visuals/`, confidence
    1.0 (the answers are the labels)."""
    rows = _release_table(release_dir, "explanations",
                          ["qa_id", "img_id", "question", "answer", "explanation", "visual_explanation",
                           "segmentation_mask"]).set_index("qa_id")
    missing = [q for q in qa_ids if q not in rows.index]
    if missing:
        raise BadInput(f"{len(missing)} of {len(qa_ids)} validation rows have no explanation in "
                       f"{release_dir}/explanations (quarantined by the explain stage?): {missing[:5]}")
    lines = []
    for val_id, qa_id in enumerate(qa_ids):
        r = rows.loc[qa_id]
        visual = [{"type": v["type"], "data": [[int(x) for x in box] for box in v["data"]],
                   "description": v["description"]} for v in r["visual_explanation"]]
        mask = r["segmentation_mask"]
        if mask is not None and mask.get("bytes"):
            name = f"visuals/{val_id}_mask{Path(mask['path'] or '.png').suffix.lower() or '.png'}"
            with atomic_path(out_dir / name) as tmp:
                tmp.write_bytes(mask["bytes"])
            visual.append({"type": "segmentation_mask", "data": name,
                           "description": "segmentation mask of the polyp (Kvasir-SEG source annotation)"})
        lines.append({"val_id": val_id, "img_id": r["img_id"], "question": r["question"], "answer": r["answer"],
                      "textual_explanation": r["explanation"], "visual_explanation": visual,
                      "confidence_score": 1.0})
    return lines


def export_task2(release_dir: Path, out_dir: Path) -> dict:
    """Write `out_dir/val_set_task2/` (`Dataset.save_to_disk`), `out_dir/submission_task2.jsonl` and
    `out_dir/visuals/`; return counts. The folder is replaced whole."""
    out_dir = Path(out_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    (out_dir / "visuals").mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="kvqa-task2-") as cache:
        val, qa_ids = validation_subset(release_dir, Path(cache))
        tmp = out_dir / f".{VAL_SET_NAME}.tmp"
        val.save_to_disk(str(tmp))
        tmp.rename(out_dir / VAL_SET_NAME)
    lines = reference_lines(release_dir, qa_ids, out_dir)
    write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), out_dir / SUBMISSION_NAME)
    return {"val_rows": len(lines), "with_boxes": sum(any(v["type"] == "bounding_box" for v in line["visual_explanation"])
                                                      for line in lines),
            "with_masks": sum(any(v["type"] == "segmentation_mask" for v in line["visual_explanation"])
                              for line in lines)}


def load_val_set(folder: Path) -> list[tuple[str, str]]:
    """(img_id, question) per val_id of a saved validation subset; BadInput (exit 2) when unreadable."""
    from datasets import load_from_disk

    try:
        ds = load_from_disk(str(folder))
    except Exception as err:  # datasets raises FileNotFoundError, ValueError, ... for a folder it cannot read
        raise BadInput(f"{folder}: not a saved validation subset ({' '.join(str(err).split())[:200]})") from None
    if not {"val_id", "img_id", "question"} <= set(ds.column_names):
        raise BadInput(f"{folder}: a validation subset needs the columns val_id, img_id, question; has {ds.column_names}")
    table = ds.select_columns(["val_id", "img_id", "question"]).to_pandas().sort_values("val_id")
    if list(table["val_id"]) != list(range(len(table))):
        raise BadInput(f"{folder}: val_id is not 0..{len(table) - 1}")
    return list(zip(table["img_id"], table["question"]))


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _path_problem(data: str, base: Path) -> str | None:
    if not data.strip():
        return "is an empty path"
    if PurePosixPath(data).is_absolute() or PureWindowsPath(data).is_absolute() or PureWindowsPath(data).drive:
        return f"{data!r} is not relative to the submission's folder"
    if "\\" in data or ".." in PurePosixPath(data).parts:
        return f"{data!r} must be a relative path with '/' separators and no '..'"
    if not (base / data).is_file():
        return f"{data!r} does not exist beside the submission"
    return None


def _visual_problems(visual: object, base: Path) -> list[str]:
    if not isinstance(visual, list):
        return [f"visual_explanation must be a list, got {type(visual).__name__}"]
    out = []
    for i, item in enumerate(visual):
        where = f"visual_explanation[{i}]"
        if not isinstance(item, dict):
            out.append(f"{where} must be an object with type, data, description")
            continue
        unknown = sorted(set(item) - {"type", "data", "description"})
        if unknown:
            out.append(f"{where} has unknown fields {unknown}")
        kind, data = item.get("type"), item.get("data")
        if not isinstance(kind, str) or not kind.strip():
            out.append(f"{where}.type must be a non-empty string")
        if "description" in item and not isinstance(item["description"], str):
            out.append(f"{where}.description must be a string")
        if kind == "bounding_box" or isinstance(data, list):
            if not (isinstance(data, list) and data and all(isinstance(b, list) and len(b) == 4 and
                                                             all(_is_number(x) for x in b) for b in data)):
                out.append(f"{where}.data must be [[x1, y1, x2, y2], ...] (numbers) for a bounding box")
            elif any(b[0] > b[2] or b[1] > b[3] or min(b) < 0 for b in data):
                out.append(f"{where}.data has a box with x1 > x2, y1 > y2 or a negative coordinate: {data}")
        elif isinstance(data, str):
            problem = _path_problem(data, base)
            if problem:
                out.append(f"{where}.data {problem}")
        else:
            out.append(f"{where}.data must be a relative file path or [[x1, y1, x2, y2]]")
    return out


def submission_problems(path: Path, val_set: list[tuple[str, str]] | None) -> list[str]:
    """Every problem of a subtask-2 submission as `file:line: what` (file-level ones as `file: what`).

    BadInput (exit 2) when the file cannot be read at all: missing, a folder, not UTF-8 text.
    """
    path = Path(path)
    text = read_user_text(path, "submission")
    problems: list[str] = []
    seen: dict[int, int] = {}
    base = path.parent
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for number, line in enumerate(lines, 1):
        def bad(what: str) -> None:
            problems.append(f"{path}:{number}: {what}")

        if not line.strip():
            bad("empty line (one JSON object per line)")
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            bad(f"not JSON: {err.msg} at column {err.colno}")
            continue
        if not isinstance(obj, dict):
            bad(f"a line must be a JSON object, got {type(obj).__name__}")
            continue
        missing = [k for k in REQUIRED if k not in obj]
        if missing:
            bad(f"missing field{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
        unknown = sorted(set(obj) - set(REQUIRED) - OPTIONAL)
        if unknown:
            bad(f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}")
        for key, kind in REQUIRED.items():
            if key in obj and (not isinstance(obj[key], kind) or isinstance(obj[key], bool)):
                bad(f"{key} must be {'an integer' if kind is int else 'a string'}, got {json.dumps(obj[key])[:60]}")
        for key in ("answer", "textual_explanation"):
            if isinstance(obj.get(key), str) and not obj[key].strip():
                bad(f"{key} is empty")
        val_id = obj.get("val_id")
        if isinstance(val_id, int) and not isinstance(val_id, bool):
            if val_id in seen:
                bad(f"val_id {val_id} is repeated (first on line {seen[val_id]})")
            else:
                seen[val_id] = number
            if val_id < 0 or (val_set is not None and val_id >= len(val_set)):
                bad(f"val_id {val_id} is not in the validation set (0..{len(val_set) - 1 if val_set else 'n-1'})")
            elif val_set is not None:
                img_id, question = val_set[val_id]
                if isinstance(obj.get("img_id"), str) and obj["img_id"] != img_id:
                    bad(f"img_id {obj['img_id']!r} does not match the validation set's {img_id!r} for val_id {val_id}")
                if isinstance(obj.get("question"), str) and obj["question"] != question:
                    bad(f"question does not match the validation set's for val_id {val_id}: {question!r}")
        if "visual_explanation" in obj:
            for what in _visual_problems(obj["visual_explanation"], base):
                bad(what)
        if "confidence_score" in obj:
            score = obj["confidence_score"]
            if not _is_number(score):
                bad(f"confidence_score must be a number in [0, 1], got {json.dumps(score)[:60]}")
            elif not 0 <= score <= 1:
                bad(f"confidence_score {score} is outside [0, 1]")
    if val_set is not None:
        absent = [i for i in range(len(val_set)) if i not in seen]
        if absent:
            shown = ", ".join(map(str, absent[:10])) + (", ..." if len(absent) > 10 else "")
            problems.append(f"{path}: {len(absent)} val_id(s) of the validation set have no line: {shown}")
    return problems
