"""The `augment_track` Prefect flow: usable images -> ten weakly augmented variants each.

Chunks of images are mapped as Prefect tasks; each task hands its chunk to a process pool (one process
per core), so the work runs in parallel while Prefect tracks every chunk. `build_release` calls the
`augment` stage below itself; `augment_track` also runs alone (`kvqa augment`), starting from the input
stages it needs.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import Executor
from pathlib import Path

from prefect import flow, task, unmapped
from prefect.cache_policies import NONE

from augment import (RenderSettings, augment_images, contact_sheet, frame_plan, load_artifact_catalog, render_chunk,
                     run_in_processes)
from augment.track import ChunkResult
from flows.dask_runner import run_on_dask
from flows.input_stages import by_reason, check_images, parse_sources, reconcile
from flows.run_state import run_lock
from flows.stage_cache import cached_stage, code_version, digests
from kvqa.catalog import load_catalog
from kvqa.config import Config, load_config
from kvqa.fanout import task_count
from kvqa.tables import atomic_path, first_rows, read_table, write_table

log = logging.getLogger("kvqa")
CONTACT_SHEET = "augment/contact-sheet.png"


@task(cache_policy=NONE, task_run_name="augment-chunk-{index}")
def augment_chunk(chunk: list[list[dict]], index: int, settings: RenderSettings, pool: Executor) -> ChunkResult:
    return pool.submit(render_chunk, chunk, settings).result()


def map_prefect_tasks(pool: Executor, chunks: list[list[list[dict]]], settings: RenderSettings) -> list:
    """One Prefect task per chunk, each handing its chunk to the process pool."""
    return augment_chunk.map(chunks, range(len(chunks)), unmapped(settings), unmapped(pool))


def chunk_runner(cfg: Config, n_images: int) -> dict:
    """`augment_images` keyword arguments for the configured runner: records batches of
    `augment.chunk_size` images, grouped in about `runner.chunks_per_worker` task runs per worker, run on
    the local process pool or on Dask."""
    r, a = cfg.runner, cfg.augment
    workers = r.n_workers if r.kind == "dask" else a.workers or os.cpu_count() or 1
    tasks = task_count(-(-n_images // a.chunk_size), workers, r.chunks_per_worker)
    run = run_on_dask(r) if r.kind == "dask" else run_in_processes(a.workers, map_prefect_tasks)
    return {"chunk_size": a.chunk_size, "tasks": tasks, "run_chunks": run}


@task(cache_policy=NONE)
def augment_stage(cfg: Config, run_dir: Path) -> dict:
    """Render the augmented track of every usable image (skipped when nothing it depends on changed)."""
    a = cfg.augment
    catalog = load_artifact_catalog(a.catalog)
    classes = load_catalog(cfg.catalog)
    key = {"code": code_version("augment"), "seed": cfg.seed, "catalog": catalog.digest,
           "question_classes": classes.digest,
           "augment": a.model_dump(mode="json", include={"enabled", "jpeg_quality", "contact_sheet_images"}),
           "inputs": digests(run_dir, "stages/images.parquet", "stages/facts.parquet")}

    def build():
        images = frame_plan(read_table(run_dir / "stages/images.parquet"), read_table(run_dir / "stages/facts.parquet"),
                            classes)
        settings = RenderSettings(catalog, cfg.seed, a.jpeg_quality, run_dir, max(s.max_pixels for s in cfg.sources))
        if not a.enabled:
            images = images.iloc[:0]
        table = run_dir / "stages/augmentations.parquet"
        bad, figures, rendered = augment_images(images, settings, table, **chunk_runner(cfg, len(images)))
        reconcile("images through augment", len(images), figures["augmented_images"], len(bad))
        reconcile("variants", figures["augmented_images"] * len(catalog.artifacts), figures["variants"])
        log.info("augment: %d variants rendered, %d verified on disk", rendered, figures["variants"] - rendered)
        write_table(bad, run_dir / "stages/quarantine_augment.parquet")
        outputs = ["stages/augmentations.parquet", "stages/quarantine_augment.parquet"]
        shown = first_rows(table, a.contact_sheet_images * len(catalog.artifacts))  # the first images' variants
        sheet = contact_sheet(shown, images, run_dir, a.contact_sheet_images)
        (run_dir / CONTACT_SHEET).unlink(missing_ok=True)
        if sheet is not None:
            with atomic_path(run_dir / CONTACT_SHEET) as tmp:
                tmp.write_bytes(sheet)
            outputs.append(CONTACT_SHEET)
        return ({**figures, "by_reason": by_reason(bad),
                 "contact_sheet": CONTACT_SHEET if sheet is not None else None}, outputs)

    return cached_stage(run_dir, "augment", key, build)


@flow(name="augment_track", log_prints=True)
def augment_track(config_path: str | None = None, output_root: str | None = None,
                  inputs_ready: bool = False) -> dict:
    """Make (or complete) the augmented track of a run: `<run>/augmented/` and `stages/augmentations.parquet`.

    `build_release` calls this with `inputs_ready=True` after its own image inventory; alone, the flow
    runs the input stages first (cached when a release build already ran them).
    """
    cfg = load_config(config_path, {"output_root": output_root} if output_root else None)
    run_dir = Path(cfg.run_dir)
    with run_lock(run_dir, "augment_track"):
        (run_dir / "stages").mkdir(parents=True, exist_ok=True)
        if not inputs_ready:
            parse_sources(cfg, run_dir)
            check_images(cfg, run_dir)
        summary = augment_stage(cfg, run_dir)
        log.info("augmented track: %d of %d images, %d variants in %s", summary["augmented_images"],
                 summary["images"], summary["variants"], run_dir / "augmented")
        return summary
