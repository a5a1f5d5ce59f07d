"""Publishing at the full release's size: ~157k QA rows over 6,500 images, the old layout against the new.

QA rows come from the text stages on the real Kvasir-VQA slice scaled to 58,849 label rows; their image ids
are folded onto 6,500 image files. Each file is a real frame (../shared/data/kvasir-seg, 27-117 kB; without
../shared, the project's sample frames) with a trailer of its own after the JPEG end marker (decoders ignore
it), so no two files share content: the new layout dictionary-encodes image bytes by content, and links to
5 frames would flatter it. The `augmented` config gets 10 such variant files per image.

Old layout = the writer before issue 12, reproduced here as the reference (`write_old_layout`): every row
embeds its image's bytes. New layout = `publish.write_release` (each image once per row group, dictionary
encoded). Reported for each: release bytes against distinct image bytes + text bytes, write time and peak
RSS while writing, `load_dataset` + iteration over every row (image bytes read, not decoded: decoding costs
the same in both layouts), the same in streaming mode. The old `augmented` config (~86 GB at full size) is
not written: its image column alone is the sum of its rows' image bytes, reported as a lower bound.

    .venv/bin/python benchmarks/publish.py [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import datasets
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from _common import SHARED, base_csv, print_json, print_table, scale_metadata

from generate import GroundingChecker, compose_plans, make_backend, realize_plans
from kvqa.catalog import load_catalog
from kvqa.config import GenerateConfig, KvasirVQASource, PlanConfig, PublishConfig
from kvqa.tables import atomic_path, plain_boxes
from publish import RELEASE_FEATURES, assign_splits, write_release
from publish.release import SPLITS, augmented_rows, column_codecs, release_rows, write_augmented_release
from sources import read_sources
from sources.images import check_image

FULL_ROWS, FULL_IMAGES, VARIANTS = 58_849, 6_500, 10
AUGMENTED_STREAMED = 10_000  # rows per split: a full pass over ~1.57M rows at ~2k rows/s would take 13 min


def frame_files() -> list[Path]:
    real = sorted((SHARED / "kvasir-seg" / "images").glob("*.jpg"))
    return real or sorted((Path(__file__).resolve().parent.parent / "data/sample/images").glob("*.jpg"))


def distinct_image(frames: list[bytes], k: int, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(frames[k % len(frames)] + f"kvqa-bench-{k:08d}".encode())
    return path


def write_old_layout(rows: pd.DataFrame, out_dir: Path, config: PublishConfig) -> list[Path]:
    """The release layout before issue 12 (the reference): shards cut by each row's image bytes + text,
    row groups of `row_group_rows` rows, every row's image bytes stored PLAIN."""
    schema, columns, paths = RELEASE_FEATURES.arrow_schema, list(RELEASE_FEATURES), []
    for split, part in rows.groupby("split", sort=False):
        size = part["n_bytes"].to_numpy() + part["question"].str.len().to_numpy() + part["answer"].str.len().to_numpy()
        shards, start, acc = [], 0, 0
        for i, s in enumerate(size):
            if acc and acc + s > config.max_shard_bytes:
                shards.append(part.iloc[start:i])
                start, acc = i, 0
            acc += int(s)
        shards.append(part.iloc[start:])
        for n, shard in enumerate(shards):
            path = out_dir / "data" / f"{split}-{n:05d}-of-{len(shards):05d}.parquet"
            last_path, last_bytes = None, b""
            with atomic_path(path) as tmp, pq.ParquetWriter(
                    tmp, schema, compression=column_codecs(schema),
                    use_dictionary=["img_id", "source", "source_label", "generator", "generator_version"]) as w:
                for start in range(0, len(shard), config.row_group_rows):
                    chunk = shard.iloc[start:start + config.row_group_rows]
                    images = []
                    for p, name in zip(chunk["path"], chunk["image_name"]):
                        if p != last_path:
                            last_path, last_bytes = p, Path(p).read_bytes()
                        images.append({"bytes": last_bytes, "path": name})
                    cols = {c: chunk[c].tolist() for c in columns if c not in ("image", "boxes")}
                    cols["image"] = images
                    cols["boxes"] = [plain_boxes(boxes) for boxes in chunk["boxes"]]
                    w.write_table(pa.Table.from_pydict({c: cols[c] for c in columns}, schema=schema))
            paths.append(path)
    return paths


def _rss_bytes(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def forked(name: str, work: Callable[[], object]) -> dict:
    """Run one phase in a forked child: the same inputs in memory, but a heap that no earlier phase has grown
    (Arrow's and Python's allocators keep what they freed; ru_maxrss only ever grows), so phases compare.
    Returns wall and CPU seconds and the child's peak resident memory (sampled every 5 ms), and its resident
    memory when it started (the inputs it inherited)."""
    child = multiprocessing.get_context("fork").Process(target=work)
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    child.start()
    start = peak = 0
    while child.is_alive():
        try:
            rss = _rss_bytes(child.pid)
        except (FileNotFoundError, ProcessLookupError, IndexError):
            break
        start, peak = start or rss, max(peak, rss)
        time.sleep(0.005)
    child.join()
    wall = time.perf_counter() - t0
    assert child.exitcode == 0, f"{name} failed"
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "peak_rss_mib": round(peak / 2**20),
            "start_rss_mib": round(start / 2**20)}


def iterate(files: list[Path], cache: Path | None, expected: int, limit: int | None = None) -> None:
    """`load_dataset` on the shards (the Parquet builder `load_dataset(folder)` uses) and one pass over
    every row of every split (or the first `limit` of each), image bytes read but not decoded; streaming
    when `cache` is None."""
    data_files = {s: [str(f) for f in files if f.name.startswith(f"{s}-")] for s in SPLITS}
    loaded = datasets.load_dataset("parquet", data_files=data_files, streaming=cache is None,
                                   cache_dir=str(cache) if cache else None)
    n = 0
    for split in SPLITS:
        for row in itertools.islice(loaded[split].cast_column("image", datasets.Image(decode=False)), limit):
            n += len(row["image"]["bytes"]) > 0
    assert n == expected, (n, expected)


def content_bytes(files: list[Path]) -> tuple[int, int]:
    """(distinct image bytes, UTF-8 bytes of the string columns) of a written release."""
    images: dict[bytes, int] = {}
    text = 0
    for f in files:
        parquet = pq.ParquetFile(f)
        for i in range(parquet.metadata.num_row_groups):
            table = parquet.read_row_group(i)
            for b in pc.unique(table.column("image").combine_chunks().field("bytes")).to_pylist():
                images[b] = len(b)
            text += sum(pc.sum(pc.binary_length(table.column(c))).as_py() or 0 for c in table.column_names
                        if pa.types.is_string(table.schema.field(c).type))
    return sum(images.values()), text


def size(files: list[Path]) -> int:
    return sum(f.stat().st_size for f in files)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="5,000 label rows and 500 images")
    args = ap.parse_args()
    n_rows, n_images = (5_000, 500) if args.quick else (FULL_ROWS, FULL_IMAGES)
    datasets.disable_progress_bars()
    catalog = load_catalog()
    config = PublishConfig()
    t: dict = {}
    cache_bytes: dict[str, int] = {}
    with tempfile.TemporaryDirectory(dir=os.environ.get("KVQA_BENCH_TMP")) as tmp:
        tmp = Path(tmp)
        scale_metadata(base_csv(), tmp / "metadata.csv", n_rows)
        facts = read_sources(
            [KvasirVQASource(metadata_csv=tmp / "metadata.csv", image_dir=tmp)], catalog).facts
        plans = compose_plans(facts, PlanConfig(), 42)
        qa, _ = realize_plans(plans, facts, make_backend(GenerateConfig(), catalog, 42), GroundingChecker(catalog))
        # Fold the scaled image ids onto n_images files (rank modulo n_images, so every file is used).
        rank = {img: k for k, img in enumerate(sorted(qa["img_id"].unique()))}
        qa["img_id"] = [f"img{rank[i] % n_images:05d}" for i in qa["img_id"]]
        facts = facts.assign(img_id=[f"img{rank[i] % n_images:05d}" if i in rank else i for i in facts["img_id"]])
        frames = [p.read_bytes() for p in frame_files()]
        recs, aug = [], []
        for k in range(n_images):
            path = distinct_image(frames, k, tmp / "images" / f"img{k:05d}.jpg")
            recs.append({"source": "kvasir-vqa", "img_id": f"img{k:05d}", "path": str(path), **check_image(path)})
            for v in range(VARIANTS):
                out = distinct_image(frames, (v + 1) * n_images + k, tmp / "augmented" / f"img{k:05d}" / f"{v:02d}.jpg")
                aug.append({"source": "kvasir-vqa", "img_id": f"img{k:05d}", "variant": v, "artifact": f"a{v}",
                            "output_path": str(out.relative_to(tmp)), "n_bytes": out.stat().st_size,
                            "width": recs[-1]["width"], "height": recs[-1]["height"], "boxes": "[]"})
        images = pd.DataFrame(recs)
        images = images[images.img_id.isin(qa.img_id)]
        augmentations = pd.DataFrame(aug)
        splits = assign_splits(qa[["source", "img_id", "source_label"]].drop_duplicates("img_id"), 0.1, 42)
        rows = release_rows(qa, splits, images)
        rss_inputs = round(_rss_bytes() / 2**20)

        # Both writers first, then the reads in the order old, new, new, old: the machine is shared and its
        # load drifts; the mirrored order cancels a linear drift, and each layout's figure is its 2 runs' mean.
        t["old write"] = forked("old write", lambda: write_old_layout(rows, tmp / "old", config))
        t["new write"] = forked("new write", lambda: write_release(qa, splits, images, tmp / "new", config))
        files = {layout: sorted((tmp / layout / "data").glob("*.parquet")) for layout in ("old", "new")}
        for layout in ("old", "new", "new", "old"):
            cache = tmp / f"cache-{layout}"
            t.setdefault(f"{layout} load + iterate", []).append(
                forked("load", lambda: iterate(files[layout], cache, len(rows))))
            cache_bytes[layout] = folder_bytes(cache)
            shutil.rmtree(cache)
            t.setdefault(f"{layout} streaming iterate", []).append(
                forked("streaming", lambda: iterate(files[layout], None, len(rows))))
        old_bytes, new_bytes = size(files["old"]), size(files["new"])
        n_old_shards, new_files = len(files["old"]), files["new"]
        shutil.rmtree(tmp / "old")
        image_bytes, text_bytes = content_bytes(new_files)

        t["augmented write"] = forked("augmented write", lambda: write_augmented_release(
            augmented_rows(rows, augmentations, facts, catalog, tmp), tmp / "new", config))
        aug_files = sorted((tmp / "new" / "augmented").glob("*.parquet"))
        aug_rows = sum(pq.ParquetFile(f).metadata.num_rows for f in aug_files)
        aug_bytes = size(aug_files)
        aug_image_bytes, aug_text_bytes = content_bytes(aug_files)
        aug_old_floor = int(augmented_rows(rows, augmentations, facts, catalog, tmp).rows["n_bytes"].sum())
        t["augmented streaming iterate"] = forked("augmented streaming", lambda: iterate(
            aug_files, None, 2 * AUGMENTED_STREAMED, limit=AUGMENTED_STREAMED))
        max_shard = max(f.stat().st_size for f in new_files + aug_files)

    def ratio(a: float, b: float) -> float:
        return round(a / b, 2)

    def mean(phase: str, key: str = "wall_s") -> float:
        runs = t[phase] if isinstance(t[phase], list) else [t[phase]]
        return round(sum(r[key] for r in runs) / len(runs), 2)

    def both(phase: str, key: str = "wall_s") -> str:
        return " / ".join(str(r[key]) for r in t[phase])

    content, aug_content = image_bytes + text_bytes, aug_image_bytes + aug_text_bytes
    aug_w, aug_s = t["augmented write"], t["augmented streaming iterate"]
    print_table(
        f"publish: {len(rows):,} rows over {len(images):,} distinct images ({image_bytes / 1e6:,.0f} MB) + "
        f"{text_bytes / 1e6:,.0f} MB of text; augmented {aug_rows:,} rows over {len(augmentations):,} variants "
        f"({aug_image_bytes / 1e6:,.0f} MB) + {aug_text_bytes / 1e6:,.0f} MB of text",
        [("", "old", "new", "new / old"),
         ("default: release MB", round(old_bytes / 1e6), round(new_bytes / 1e6), ratio(new_bytes, old_bytes)),
         ("default: release / (distinct images + text)", ratio(old_bytes, content), ratio(new_bytes, content), ""),
         ("default: shards", n_old_shards, len(new_files), ""),
         *[(f"default: {phase} {unit} s", mean(f"old {phase}", key), mean(f"new {phase}", key),
            ratio(mean(f"new {phase}", key), mean(f"old {phase}", key)))
           for phase in ("write", "load + iterate", "streaming iterate")
           for unit, key in (("wall", "wall_s"), ("CPU", "cpu_s"))],
         *[(f"  each run: {phase} wall s", both(f"old {phase}"), both(f"new {phase}"), "")
           for phase in ("load + iterate", "streaming iterate")],
         ("default: peak RSS MiB while writing", t["old write"]["peak_rss_mib"], t["new write"]["peak_rss_mib"],
          f"(inputs in memory at the fork: {rss_inputs})"),
         ("default: peak RSS MiB while streaming", mean("old streaming iterate", "peak_rss_mib"),
          mean("new streaming iterate", "peak_rss_mib"), ""),
         ("default: datasets' Arrow cache MB after load", round(cache_bytes["old"] / 1e6),
          round(cache_bytes["new"] / 1e6), ""),
         ("augmented: release MB", f">= {aug_old_floor / 1e6:,.0f} (not written)", round(aug_bytes / 1e6),
          f"<= {ratio(aug_bytes, aug_old_floor)}"),
         ("augmented: release / (distinct images + text)", f">= {ratio(aug_old_floor, aug_content)}",
          ratio(aug_bytes, aug_content), ""),
         ("augmented: write wall / CPU s, peak RSS MiB", "",
          f"{aug_w['wall_s']} / {aug_w['cpu_s']}, {aug_w['peak_rss_mib']}", ""),
         (f"augmented: streaming {AUGMENTED_STREAMED:,} rows per split: wall s, peak RSS MiB", "",
          f"{aug_s['wall_s']}, {aug_s['peak_rss_mib']}", ""),
         ("largest shard MB (max_shard_bytes)", "", f"{max_shard / 1e6:.0f} ({config.max_shard_bytes / 1e6:.0f})",
          "")])
    print_json({"benchmark": "publish", "rows": len(rows), "images": int(len(images)), "image_bytes": image_bytes,
                "text_bytes": text_bytes, "old_bytes": old_bytes, "new_bytes": new_bytes,
                "new_over_content": ratio(new_bytes, content), "old_over_content": ratio(old_bytes, content),
                "augmented_rows": aug_rows, "augmented_bytes": aug_bytes, "augmented_image_bytes": aug_image_bytes,
                "augmented_text_bytes": aug_text_bytes, "augmented_over_content": ratio(aug_bytes, aug_content),
                "augmented_old_image_column_bytes": aug_old_floor, "old_cache_bytes": cache_bytes["old"],
                "new_cache_bytes": cache_bytes["new"], "max_shard_bytes": max_shard, "rss_inputs_mib": rss_inputs,
                "phases": t})


if __name__ == "__main__":
    main()
