"""The augmented track: every usable image x every artifact, rendered in worker processes, resumable.

Augmentations table (`stages/augmentations.parquet`), one row per variant:

| column | type | meaning |
|---|---|---|
| source, img_id | str | the input image |
| variant | int | 0..n-1, the artifact's position in the catalog |
| artifact | str | the artifact's name |
| input_sha256 | str | digest of the input file's bytes |
| output_path | str | the JPEG, relative to the run folder: `augmented/<source>/<img_id>/<variant>-<artifact>.jpg` |
| output_sha256 | str | digest of the JPEG's bytes |
| width, height | int | pixel size (always the input's) |
| mode | str | `RGB`, or `L` for grayscale inputs |
| n_bytes | int | JPEG size |
| geometry | bool | the geometric base steps ran (false: photometric only, see augment/frames.py) |
| boxes | str | JSON list of the variant's boxes (label, xmin, ymin, xmax, ymax in its pixels): the input's boxes moved by the geometric steps, clipped, those under `MIN_VISIBLE` dropped |
| recipe | str | JSON: versions, modes, quality, the input boxes and every step's transform, arguments, seed and applied parameters |

Images are cut into batches of `batch_size` (the unit of resumption): a batch renders all variants of its
images (each image is decoded once and encoded n times) and writes its records to `augment/records/`, so a
killed run keeps every finished batch. Batches are grouped into task chunks, about `chunks_per_worker` per
worker (the unit of scheduling, `kvqa.fanout`), so the number of task runs is bounded by the workers, not
by the images: 100,000 images on 2 workers make 32 task runs, not 12,500. On a re-run a variant is skipped
when its record plans the same steps, seeds and quality for the same input bytes and the file on disk
still has the recorded digest.

The records stay on disk: the plan names, for each image, the records files that hold its variants (an
index read from two columns), a batch reads its images' records itself (on the worker), chunks hand back
counts, and the table is streamed from the batch files in row groups of `ROW_GROUP_ROWS`. The flow's
process never holds the records of the whole track (1.1M variants of ~1.6 KB for all of HyperKvasir).

Worker processes. The pool starts its workers from a `forkserver`, never by forking the parent: the
parent has usually run OpenCV already (the Kvasir-SEG mask reader's `connectedComponentsWithStats` starts
OpenCV's thread pool), and a forked child inherits that pool's locks without its threads, so its first
`cv2.setNumThreads` waits forever. The fork server is a fresh interpreter that only imports this module
(once per parent process, a few seconds; each pool after that starts in milliseconds), and each worker
sets OpenCV to one thread before any OpenCV call. Each worker also watches the process that owns the pool
and exits when it dies (SIGKILL included), so no worker outlives a killed run and writes into its folder
afterwards; the fork server then exits too.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import select
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from augment.catalog import ArtifactCatalog
from augment.render import (VERSIONS, AugmentImageError, apply_steps, decode_image, encode_jpeg, make_recipe,
                            plan_recipe)
from kvqa.config import DEFAULT_MAX_PIXELS
from kvqa.fanout import contiguous_chunks
from kvqa.tables import (atomic_path, quarantine_frame, remove_orphan_temps, stable_hash, write_table,
                         write_table_pieces)

AUGMENT_COLUMNS = ["source", "img_id", "variant", "artifact", "input_sha256", "output_path", "output_sha256",
                   "width", "height", "mode", "n_bytes", "geometry", "boxes", "recipe"]
AUGMENT_DTYPES = {**dict.fromkeys(AUGMENT_COLUMNS, "str"), "variant": "int32", "width": "int32", "height": "int32",
                  "n_bytes": "int64", "geometry": "bool"}
# Rows per row group of the stage table: what the flow holds at once while writing it (~26 MB of records).
ROW_GROUP_ROWS = 16_384
RECORDS_DIR = "augment/records"
STAGE = "augment"
# The code that decides a variant's bytes and recipe (decode, plan, apply, encode; the transforms it builds,
# the EXIF reading, the seeds' hash; `test_stage_keys` traces a render and checks this list): a recorded
# variant is reused only when it was rendered by the same bytes of these files (an edit elsewhere in augment
# redoes the stage, which then verifies the variants on disk and keeps them).
RENDER_CODE = ("augment/render.py", "augment/catalog.py", "sources/images.py", "kvqa/tables.py")


@dataclass(frozen=True)
class RenderSettings:
    """What a worker needs besides its chunk; picklable, sent once per chunk."""

    catalog: ArtifactCatalog
    seed: int
    jpeg_quality: int
    run_dir: Path
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger inputs are quarantined (`too_large`), never decoded
    render_code: str = ""  # digest of `RENDER_CODE` (`kvqa.stage.source_digest`), recorded in every recipe

    @property
    def digest(self) -> str:
        return stable_hash(self.catalog.digest, self.seed, self.jpeg_quality, json.dumps(VERSIONS, sort_keys=True),
                           self.render_code)[:16]


@dataclass(frozen=True)
class ChunkResult:
    """What a chunk hands back to the flow: counts and its quarantine; its records stay in their files."""

    quarantine: pd.DataFrame
    images: int  # images augmented (the chunk's images less its quarantine)
    rendered: int  # variants rendered now (the others were verified on disk and kept)


def records_frame(records: list[dict]) -> pd.DataFrame:
    """Records as a frame of the table's column types (an empty batch too: its file has the same schema)."""
    return pd.DataFrame(records, columns=AUGMENT_COLUMNS).astype(AUGMENT_DTYPES)


AUGMENT_SCHEMA = pa.Schema.from_pandas(records_frame([]), preserve_index=False)


def output_path(source: str, img_id: str, variant: int, artifact: str) -> str:
    return f"augmented/{source}/{img_id}/{variant:02d}-{artifact}.jpg"


def _planned_steps(recipe_json: str) -> list[dict]:
    return [{k: s[k] for k in ("name", "transform", "init", "seed")} for s in json.loads(recipe_json)["steps"]]


def _reusable(prior: dict | None, planned: list[dict], input_sha: str, boxes: list[dict],
              settings: RenderSettings) -> bool:
    """A recorded variant can stand when it planned exactly this for the same boxes and its file still has
    its digest."""
    if prior is None or prior["input_sha256"] != input_sha:
        return False
    recipe = json.loads(prior["recipe"])
    if (recipe["jpeg_quality"] != settings.jpeg_quality or recipe["versions"] != VERSIONS
            or recipe.get("render_code") != settings.render_code
            or recipe.get("input_boxes") != boxes
            or _planned_steps(prior["recipe"]) != json.loads(json.dumps(planned))):
        return False
    path = settings.run_dir / prior["output_path"]
    return path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == prior["output_sha256"]


def render_image(image: dict, prior: dict[int, dict], settings: RenderSettings, transforms: dict) -> tuple[list[dict], int]:
    """All variants of one image (a row of `augment.frames.frame_plan`: its path, whether the geometric
    steps run, its boxes); returns (records, how many were rendered rather than reused)."""
    data = Path(image["path"]).read_bytes()
    input_sha = hashlib.sha256(data).hexdigest()
    catalog, records, rendered = settings.catalog, [], 0
    geometry, boxes = bool(image["geometry"]), list(image["boxes"])
    decoded = None
    for variant, artifact in enumerate(catalog.artifacts):
        old = prior.get(variant)
        if old is not None and decoded is None:
            planned = plan_recipe(catalog, settings.seed, image["source"], image["img_id"], variant,
                                  int(old["height"]), int(old["width"]), geometry)
            if _reusable(old, planned, input_sha, boxes, settings):
                records.append(old)
                continue
        if decoded is None:
            decoded = decode_image(data, Path(image["path"]).name, settings.max_pixels)
        height, width = decoded.pixels.shape[:2]
        planned = plan_recipe(catalog, settings.seed, image["source"], image["img_id"], variant, height, width,
                              geometry)
        if _reusable(old, planned, input_sha, boxes, settings):
            records.append(old)
            continue
        pixels, applied, moved = apply_steps(decoded.pixels, planned, transforms, boxes)
        jpeg = encode_jpeg(pixels, decoded.output_mode, settings.jpeg_quality)
        rel = output_path(image["source"], image["img_id"], variant, artifact.name)
        with atomic_path(settings.run_dir / rel) as tmp:
            tmp.write_bytes(jpeg)
        rendered += 1
        records.append({"source": image["source"], "img_id": image["img_id"], "variant": variant,
                        "artifact": artifact.name, "input_sha256": input_sha, "output_path": rel,
                        "output_sha256": hashlib.sha256(jpeg).hexdigest(), "width": width, "height": height,
                        "mode": decoded.output_mode, "n_bytes": len(jpeg), "geometry": geometry,
                        "boxes": json.dumps(moved, separators=(",", ":")),
                        "recipe": make_recipe(applied, decoded, settings.jpeg_quality, boxes, settings.render_code)})
    return records, rendered


_TRANSFORMS: dict = {}  # per worker process: built transforms by (class, arguments)


def batch_file(batch: list[dict], settings: RenderSettings) -> str:
    """The records file of a batch: named by its images and what they are rendered with."""
    key = stable_hash(settings.digest, *(f"{i['source']}/{i['img_id']}" for i in batch))[:20]
    return f"{RECORDS_DIR}/batch-{key}.parquet"


def render_batch(batch: list[dict], settings: RenderSettings) -> ChunkResult:
    """Render (or verify) every variant of a batch's images and persist the batch's records.

    Each item of `batch` is an image row (`source`, `img_id`, `path`) plus `prior_files`, the records
    files that hold its recorded variants (read here, on the worker). An image that does not decode is
    quarantined here, with its reason; the batch goes on.
    """
    prior = recorded_variants(batch, settings.run_dir)
    records, bad, rendered = [], [], 0
    for image in batch:
        try:
            recs, n = render_image(image, prior.get((image["source"], image["img_id"]), {}), settings, _TRANSFORMS)
            records += recs
            rendered += n
        except (AugmentImageError, OSError) as err:
            bad.append({"stage": STAGE, "source": image["source"], "key": image["img_id"],
                        "reason": getattr(err, "reason", "unreadable_image"), "detail": str(err),
                        "raw": image["path"]})
    write_table(records_frame(records), settings.run_dir / batch_file(batch, settings))
    return ChunkResult(quarantine_frame(bad), len(batch) - len(bad), rendered)


def merged(results: list[ChunkResult]) -> ChunkResult:
    return ChunkResult(pd.concat([r.quarantine for r in results], ignore_index=True) if results else quarantine_frame([]),
                       sum(r.images for r in results), sum(r.rendered for r in results))


def render_chunk(chunk: list[list[dict]], settings: RenderSettings) -> ChunkResult:
    """Render a task's chunk: its batches one after the other, each persisted as it finishes."""
    return merged([render_batch(batch, settings) for batch in chunk])


def chunk_images(chunk: list[list[dict]]) -> int:
    return sum(map(len, chunk))


def recorded_files(run_dir: Path) -> dict[tuple[str, str], list[str]]:
    """(source, img_id) -> the records files holding variants of that image, in name order; only the two
    key columns are read."""
    index: dict[tuple[str, str], list[str]] = {}
    for f in sorted((run_dir / RECORDS_DIR).glob("batch-*.parquet")):
        keys = pq.read_table(f, columns=["source", "img_id"])
        for key in set(zip(keys["source"].to_pylist(), keys["img_id"].to_pylist())):
            index.setdefault(key, []).append(str(f.relative_to(run_dir)))
    return index


def recorded_variants(batch: list[dict], run_dir: Path) -> dict[tuple[str, str], dict[int, dict]]:
    """The recorded variants of a batch's images, variant by variant; a later file (in name order) wins."""
    keys = {(image["source"], image["img_id"]) for image in batch}
    prior: dict[tuple[str, str], dict[int, dict]] = {}
    for f in sorted({f for image in batch for f in image["prior_files"]}):
        for rec in pq.read_table(run_dir / f).to_pylist():
            if (rec["source"], rec["img_id"]) in keys:
                prior.setdefault((rec["source"], rec["img_id"]), {})[int(rec["variant"])] = rec
    return prior


def plan_batches(images: pd.DataFrame, run_dir: Path, batch_size: int) -> list[list[dict]]:
    """Images in (source, img_id) order, cut in batches, each image naming the files of its recorded variants."""
    index = recorded_files(run_dir)
    rows = images.sort_values(["source", "img_id"])[["source", "img_id", "path", "geometry", "boxes"]].to_dict("records")
    for row in rows:
        row["prior_files"] = index.get((row["source"], row["img_id"]), [])
    return [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]


ChunkRunner = Callable[[list[list[list[dict]]], RenderSettings], list[ChunkResult]]


def submit_to_pool(pool: ProcessPoolExecutor, chunks: list[list[list[dict]]], settings: RenderSettings) -> list:
    return [pool.submit(render_chunk, c, settings) for c in chunks]


def one_opencv_thread() -> None:
    """OpenCV on one thread in every process that renders: one process per core (its own threads would
    only oversubscribe), and the output depends on it: albumentations' Illumination (vignetting, corner
    mode) gives other bytes on 2 threads than on 1 (2 of the sample's 740 variants). Set before any
    OpenCV call of the process."""
    cv2.setNumThreads(1)


def start_worker(owner_pid: int) -> None:
    """Initializer of every pool worker: one OpenCV thread (`one_opencv_thread`) and a watchdog that ends
    the worker when the process that owns the pool dies."""
    one_opencv_thread()
    threading.Thread(target=exit_with_owner, args=(owner_pid,), name="exit-with-owner", daemon=True).start()


def exit_with_owner(owner_pid: int, interval_s: float = 0.5) -> None:
    """Exit this process as soon as the pool's owner has exited, SIGKILL included.

    The owner is not the worker's parent (the fork server is), and the fork server outlives the owner
    while any worker runs, so the parent id never changes: the owner is watched by a pidfd (Linux, no
    risk of a reused pid), else by polling its pid."""
    try:
        pidfd = os.pidfd_open(owner_pid)
    except ProcessLookupError:
        os._exit(1)
    except (AttributeError, OSError):  # no pidfd (not Linux, or Linux < 5.3)
        while _pid_exists(owner_pid):
            time.sleep(interval_s)
    else:
        select.select([pidfd], [], [])  # readable once the owner has exited
    os._exit(1)


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_pool(workers: int) -> ProcessPoolExecutor:
    """`workers` processes (0 = one per core) started from a fork server that has imported this module
    (see the module docstring for why not fork)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["__main__", __name__])  # no effect once this process's server runs
    return ProcessPoolExecutor(max_workers=workers or os.cpu_count() or 1, mp_context=context,
                               initializer=start_worker, initargs=(os.getpid(),))


def run_in_processes(workers: int, submit=submit_to_pool) -> ChunkRunner:
    """Render chunks in `workers` processes (0 = one per core), with a progress bar. `submit(pool, chunks,
    settings)` returns one future per chunk (the flow's maps a Prefect task per chunk onto the pool)."""
    def run(chunks: list[list[list[dict]]], settings: RenderSettings) -> list[ChunkResult]:
        with process_pool(workers) as pool:
            futures = submit(pool, chunks, settings)
            total = sum(map(chunk_images, chunks))
            with tqdm(total=total, desc="augment", unit="img", mininterval=1.0, disable=total < 50) as bar:
                results = []
                for chunk, fut in zip(chunks, futures):
                    results.append(fut.result())
                    bar.update(chunk_images(chunk))
        return results
    return run


def augment_images(images: pd.DataFrame, settings: RenderSettings, table: Path, *, batch_size: int = 8,
                   tasks: int | None = None, run_chunks: ChunkRunner | None = None) -> tuple[pd.DataFrame, dict, int]:
    """Render the augmented track of `images` (a frame plan: `augment.frames.frame_plan`), write its table to
    `table`; return (quarantine, figures, rendered).

    `rendered` counts the variants rendered now rather than verified on disk (not a figure of the
    release: it differs between a fresh and a resumed run). Images are persisted in batches of
    `batch_size`; `run_chunks` gets the batches grouped in `tasks` chunks (default: one chunk per batch).
    The table is the batches' records files in batch order, which is (source, img_id, variant) order.

    Leaves exactly this run's variants under `augmented/` and this run's records under `augment/records/`
    (files from a previous catalog or image set, and temporary files a killed run left, are removed), so
    the folder always matches the table.
    """
    run_dir = settings.run_dir
    for folder in ("augmented", "augment"):  # a run folder has one writer: these are a killed run's
        remove_orphan_temps(run_dir / folder)
    batches = plan_batches(images, run_dir, batch_size)
    chunks = contiguous_chunks(batches, tasks or len(batches))
    result = merged((run_chunks or run_in_processes(0))(chunks, settings))
    files = [batch_file(b, settings) for b in batches]
    variants = write_table_pieces((pq.read_table(run_dir / f) for f in files), table, AUGMENT_SCHEMA, ROW_GROUP_ROWS)
    keep_records = set(files)
    for f in (run_dir / RECORDS_DIR).glob("*.parquet"):  # (older versions named them chunk-*.parquet)
        if str(f.relative_to(run_dir)) not in keep_records:
            f.unlink()
    keep_files = set(pq.read_table(table, columns=["output_path"])["output_path"].to_pylist())
    for f in (run_dir / "augmented").rglob("*.jpg") if (run_dir / "augmented").is_dir() else []:
        if str(f.relative_to(run_dir)) not in keep_files:
            f.unlink()
    figures = {"images": len(images), "augmented_images": result.images, "variants": variants,
               "quarantined": len(result.quarantine), "artifacts": [a.name for a in settings.catalog.artifacts]}
    return result.quarantine, figures, result.rendered
