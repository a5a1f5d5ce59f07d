"""The augmented track: variants per second against the authors' recipe and an encode floor, same run.

Two image sets: frames resized to 720x576 (the common HyperKvasir/Kvasir size) and the real Kvasir-SEG
frames at their own sizes (617x528 to 1348x1070; ../shared/data, else the sample's 400x320 frames). Each
set has N image ids over those files (ids differ, so every image draws its own parameters).

Measured in the same run, on the same images:
- ours: `augment_images`, ten variants per image, one process per core (and, for reference, one process);
- the authors' recipe run the way they run it: one process, one variant per image, the PIL operations that
  torchvision's RandomResizedCrop (bicubic) / RandomAffine (nearest, fill 0) / ColorJitter call for a PIL
  image (torchvision cannot be installed beside CPU torch 2.13 here), decode + transforms + JPEG encode;
- the floor: decode each image once and encode ten JPEGs, no transform, with the same processes as ours.

    .venv/bin/python benchmarks/augment.py [--quick]
"""

from __future__ import annotations

import argparse
import io
import math
import os
import random
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd
from _common import ROOT, SHARED, print_json, print_table
from PIL import Image, ImageEnhance

from augment import RenderSettings, augment_images, frame_plan, load_artifact_catalog, run_in_processes
from augment.render import decode_image, encode_jpeg
from kvqa.config import AugmentConfig

QUALITY = 95
FULL_TRACK_IMAGES = 6_500


def frame_files() -> list[Path]:
    real = sorted((SHARED / "kvasir-seg" / "images").glob("*.jpg"))
    return real or sorted((ROOT / "data/sample/images").glob("*.jpg"))


def make_sets(tmp: Path, n: int) -> dict[str, pd.DataFrame]:
    """{name: images table} for the 720x576 set and the real-size set, n ids each, cycling over files."""
    resized = []
    for p in frame_files():
        out = tmp / f"720x576-{p.stem}.jpg"
        with Image.open(p) as im:
            im.convert("RGB").resize((720, 576), Image.Resampling.BICUBIC).save(out, "JPEG", quality=QUALITY)
        resized.append(out)
    sets = {}
    for name, files in (("720x576", resized), ("real sizes", frame_files())):
        paths = [files[i % len(files)] for i in range(n)]
        sets[name] = pd.DataFrame({"source": "bench", "img_id": [f"{p.stem}-{i:05d}" for i, p in enumerate(paths)],
                                   "path": [str(p) for p in paths]})
    return sets


def authors_variant(path: str, rng: random.Random) -> bytes:
    """One variant the authors' way: torchvision's PIL code path for their transforms, then JPEG."""
    with Image.open(path) as im:
        im = im.convert("RGB")
    width, height = im.size
    area, aspect = width * height, width / height
    for _ in range(10):  # RandomResizedCrop.get_params
        target = area * rng.uniform(0.9, 1.0)
        ratio = math.exp(rng.uniform(math.log(0.95 * aspect), math.log(1.05 * aspect)))
        cw, ch = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
        if 0 < cw <= width and 0 < ch <= height:
            break
    else:
        cw, ch = width, height
    x, y = rng.randint(0, width - cw), rng.randint(0, height - ch)
    im = im.resize((width, height), Image.Resampling.BICUBIC, box=(x, y, x + cw, y + ch))
    angle = rng.uniform(-10, 10)
    tx, ty = round(rng.uniform(-0.1, 0.1) * width), round(rng.uniform(-0.1, 0.1) * height)
    im = im.rotate(angle, Image.Resampling.NEAREST, translate=(tx, ty), fillcolor=0)
    for adjust in rng.sample([ImageEnhance.Brightness, ImageEnhance.Contrast], 2):
        im = adjust(im).enhance(rng.uniform(0.8, 1.2))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=QUALITY)
    return buf.getvalue()


def run_authors(images: pd.DataFrame, out: Path) -> float:
    rng = random.Random(42)  # their one global seed
    t0 = time.perf_counter()
    for img_id, path in zip(images["img_id"], images["path"]):
        (out / f"{img_id}.jpg").write_bytes(authors_variant(path, rng))
    return time.perf_counter() - t0


def floor_chunk(paths: list[str], out: str, n_variants: int) -> int:
    for i, p in enumerate(paths):
        decoded = decode_image(Path(p).read_bytes(), p)
        for v in range(n_variants):
            Path(out, f"{i}-{v}.jpg").write_bytes(encode_jpeg(decoded.pixels, decoded.output_mode, QUALITY))
    return len(paths)


def run_floor(images: pd.DataFrame, out: Path, workers: int, n_variants: int, chunk: int = 16) -> float:
    paths = list(images["path"])
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers) as pool:
        chunks = [paths[i:i + chunk] for i in range(0, len(paths), chunk)]
        folders = []
        for k in range(len(chunks)):
            (out / str(k)).mkdir(parents=True)
            folders.append(str(out / str(k)))
        list(pool.map(floor_chunk, chunks, folders, [n_variants] * len(chunks)))
    return time.perf_counter() - t0


def run_ours(images: pd.DataFrame, run_dir: Path, workers: int) -> float:
    settings = RenderSettings(load_artifact_catalog(), 42, QUALITY, run_dir)
    t0 = time.perf_counter()
    batch_size = AugmentConfig().batch_size
    bad, figures, rendered = augment_images(frame_plan(images), settings, run_dir / "stages" / "augmentations.parquet",
                                            batch_size=batch_size, run_chunks=run_in_processes(workers))
    assert len(bad) == 0 and rendered == figures["variants"]
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="32 images per set instead of 320")
    args = ap.parse_args()
    n = 32 if args.quick else 320
    cores = os.cpu_count() or 1
    n_variants = len(load_artifact_catalog().artifacts)
    figures: dict = {"images_per_set": n, "cores": cores, "variants_per_image": n_variants}
    rows = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("KVQA_BENCH_TMP")) as tmp:
        tmp = Path(tmp)
        for name, images in make_sets(tmp, n).items():
            key = name.replace(" ", "_")
            (tmp / key / "authors").mkdir(parents=True)
            authors_s = run_authors(images, tmp / key / "authors")
            ours_s = run_ours(images, tmp / key / "ours", cores)
            ours_1_s = run_ours(images, tmp / key / "ours-1", 1)
            floor_s = run_floor(images, tmp / key / "floor", cores, n_variants)
            per = {"authors_ms_per_variant": 1000 * authors_s / n,
                   "ours_ms_per_variant": 1000 * ours_s / (n * n_variants),
                   "ours_1proc_ms_per_variant": 1000 * ours_1_s / (n * n_variants),
                   "floor_ms_per_variant": 1000 * floor_s / (n * n_variants)}
            fig = {k: round(v, 3) for k, v in per.items()}
            fig |= {"variants_per_s": round(n * n_variants / ours_s, 1),
                    "speedup_vs_authors": round(per["authors_ms_per_variant"] / per["ours_ms_per_variant"], 2),
                    "speedup_vs_authors_1proc": round(per["authors_ms_per_variant"] / per["ours_1proc_ms_per_variant"], 2),
                    "ratio_to_floor": round(per["ours_ms_per_variant"] / per["floor_ms_per_variant"], 2),
                    "full_track_min": round(FULL_TRACK_IMAGES * n_variants * per["ours_ms_per_variant"] / 60_000, 1)}
            figures[key] = fig
            rows += [(f"{name}: authors (1 process, 1 variant/image)", f"{fig['authors_ms_per_variant']:.2f} ms/variant"),
                     (f"{name}: ours ({cores} processes)", f"{fig['ours_ms_per_variant']:.2f} ms/variant",
                      f"{fig['variants_per_s']} variants/s", f"{fig['speedup_vs_authors']}x authors"),
                     (f"{name}: ours (1 process)", f"{fig['ours_1proc_ms_per_variant']:.2f} ms/variant",
                      f"{fig['speedup_vs_authors_1proc']}x authors"),
                     (f"{name}: floor (decode once, encode {n_variants})", f"{fig['floor_ms_per_variant']:.2f} ms/variant",
                      f"ours = {fig['ratio_to_floor']}x floor"),
                     (f"{name}: {FULL_TRACK_IMAGES:,} images x {n_variants}", f"{fig['full_track_min']} min")]
    print_table(f"augmented track, {n} images per set, {cores} cores", rows)
    print_json(figures)


if __name__ == "__main__":
    main()
