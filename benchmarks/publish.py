"""Publishing at the full release's size: ~157k QA rows over 6,500 embedded images.

QA rows come from the text stages on the real Kvasir-VQA slice scaled to 58,849 label rows; their image ids
are folded onto 6,500 image files, which are links to real frames (../shared/data/kvasir-seg, 27-117 kB)
or, without ../shared, to the project's sample frames. Reported: wall time, rows/s, MB/s, peak RSS of the
process, and the ratio to an I/O floor measured in the same run (reading every row's image bytes and
writing them to one file, no parquet).

    .venv/bin/python benchmarks/publish.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
from _common import SHARED, base_csv, peak_rss_mib, print_json, print_table, scale_metadata, timed

from generate import GroundingChecker, compose_plans, make_backend, realize_plans
from kvqa.catalog import load_catalog
from kvqa.config import GenerateConfig, KvasirVQASource, PlanConfig, PublishConfig
from publish import assign_splits, write_release
from publish.release import release_rows
from sources import read_sources
from sources.images import check_image

FULL_ROWS, FULL_IMAGES = 58_849, 6_500


def frame_files() -> list[Path]:
    real = sorted((SHARED / "kvasir-seg" / "images").glob("*.jpg"))
    return real or sorted((Path(__file__).resolve().parent.parent / "data/sample/images").glob("*.jpg"))


def io_floor(rows: pd.DataFrame, out: Path) -> float:
    """Read each row's image (once per consecutive run of the same image) and write the bytes out."""
    t0 = time.perf_counter()
    last, data = None, b""
    with open(out, "wb") as f:
        for p in rows["path"]:
            if p != last:
                last, data = p, Path(p).read_bytes()
            f.write(data)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="5,000 label rows and 500 images")
    args = ap.parse_args()
    n_rows, n_images = (5_000, 500) if args.quick else (FULL_ROWS, FULL_IMAGES)
    catalog = load_catalog()
    t: dict = {}
    with tempfile.TemporaryDirectory(dir=os.environ.get("KVQA_BENCH_TMP")) as tmp:
        tmp = Path(tmp)
        scale_metadata(base_csv(), tmp / "metadata.csv", n_rows)
        facts = read_sources(
            [KvasirVQASource(metadata_csv=tmp / "metadata.csv", image_dir=tmp)], catalog).facts
        plans = compose_plans(facts, PlanConfig(), 42)
        qa, _ = realize_plans(plans, facts, make_backend(GenerateConfig(), catalog, 42),
                                         GroundingChecker(catalog))
        # Fold the scaled image ids onto n_images files (rank modulo n_images, so every file is used).
        rank = {img: k for k, img in enumerate(sorted(qa["img_id"].unique()))}
        qa["img_id"] = [f"img{rank[i] % n_images:05d}" for i in qa["img_id"]]
        frames = frame_files()
        (tmp / "images").mkdir()
        recs = []
        for k in range(n_images):
            link = tmp / "images" / f"img{k:05d}.jpg"
            link.symlink_to(frames[k % len(frames)])
            recs.append({"source": "kvasir-vqa", "img_id": f"img{k:05d}", "path": str(link),
                         **check_image(link)})
        images = pd.DataFrame(recs)
        images = images[images.img_id.isin(qa.img_id)]
        splits = assign_splits(qa[["source", "img_id", "source_label"]].drop_duplicates("img_id"), 0.1, 42)
        rss_before = peak_rss_mib()
        with timed(t, "write_release"):
            files = write_release(qa, splits, images, tmp / "release", PublishConfig())
        rss_after = peak_rss_mib()
        out_bytes = sum((tmp / "release" / f["file"]).stat().st_size for fs in files.values() for f in fs)
        rows_written = sum(pq.ParquetFile(tmp / "release" / f["file"]).metadata.num_rows
                           for fs in files.values() for f in fs)
        floor_s = io_floor(release_rows(qa, splits, images), tmp / "floor.bin")
    wall = t["write_release"]["wall_s"]
    n_shards = sum(len(fs) for fs in files.values())
    print_table(f"publish: {rows_written:,} rows, {len(images):,} images embedded, {n_shards} shards "
                f"({out_bytes / 1e9:.2f} GB) from {len(frames)} base frames",
                [("write_release wall s", wall), ("write_release cpu s", t["write_release"]["cpu_s"]),
                 ("rows / s", round(rows_written / wall)), ("MB / s", round(out_bytes / 1e6 / wall)),
                 ("I/O floor s (read + write same bytes)", round(floor_s, 3)),
                 ("ratio to floor", round(wall / floor_s, 2)),
                 ("peak RSS MiB before / after", f"{rss_before} / {rss_after}")])
    print_json({"benchmark": "publish", "rows": rows_written, "images": int(len(images)), "shards": n_shards,
                "bytes": out_bytes, "write_s": wall, "cpu_s": t["write_release"]["cpu_s"],
                "rows_per_s": round(rows_written / wall), "io_floor_s": round(floor_s, 3),
                "ratio_to_floor": round(wall / floor_s, 2), "peak_rss_mib_before": rss_before,
                "peak_rss_mib_after": rss_after})


if __name__ == "__main__":
    main()
