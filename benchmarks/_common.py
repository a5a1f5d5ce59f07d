"""Helpers shared by the benchmarks: scaling the real Kvasir-VQA slice, timing, the closing JSON line."""

from __future__ import annotations

import csv
import json
import resource
import sys
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data"
REAL_CSV = SHARED / "kvasir-vqa" / "metadata-sample.csv"
SAMPLE_CSV = ROOT / "data" / "sample" / "metadata.csv"


def base_csv() -> Path:
    """The real 1,814-row slice when ../shared is there, else the project's own sample."""
    return REAL_CSV if REAL_CSV.is_file() else SAMPLE_CSV


def scale_metadata(src: Path, dest: Path, target_rows: int) -> dict:
    """Write `target_rows` label rows by repeating whole images of `src` under new ids (`<id>r<k>`)."""
    with open(src, newline="") as f:
        rows = list(csv.DictReader(f))
    by_image: dict[str, list[dict]] = {}
    for r in rows:
        by_image.setdefault(r["img_id"], []).append(r)
    written, images, k = 0, 0, 0
    with open(dest, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["source", "question", "answer", "img_id"], lineterminator="\n")
        w.writeheader()
        while written < target_rows:
            for img_id, img_rows in by_image.items():
                take = img_rows[: target_rows - written]
                for r in take:
                    w.writerow({**r, "img_id": f"{img_id}r{k}"})
                written += len(take)
                images += 1
                if written >= target_rows:
                    break
            k += 1
    return {"rows": written, "images": images, "base": str(src)}


@contextmanager
def timed(results: dict, name: str):
    t0, c0 = time.perf_counter(), time.process_time()
    yield
    results[name] = {"wall_s": round(time.perf_counter() - t0, 3), "cpu_s": round(time.process_time() - c0, 3)}


def peak_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def print_table(title: str, rows: list[tuple]) -> None:
    print(f"\n{title}")
    width = max(len(str(r[0])) for r in rows)
    for r in rows:
        print(f"  {str(r[0]):<{width}}  " + "  ".join(str(c) for c in r[1:]))


def print_json(figures: dict) -> None:
    """The benchmark's last line: one JSON object with its figures."""
    sys.stderr.flush()
    print(json.dumps(figures, sort_keys=True), flush=True)
