"""The augment stage: every usable image -> its ten weakly augmented variants (the robustness track)."""

from __future__ import annotations

import logging
import os

from augment import RenderSettings, augment_images, contact_sheet, frame_plan, load_artifact_catalog
from augment.track import RENDER_CODE
from kvqa.catalog import load_catalog
from kvqa.fanout import task_count
from kvqa.reconcile import by_reason, reconcile
from kvqa.stage import Stage, StageRun, source_digest
from kvqa.tables import atomic_path, first_rows, write_table

log = logging.getLogger("kvqa")
CONTACT_SHEET = "augment/contact-sheet.png"
# Every wheel that installs `cv2` or `PIL` is named: whichever is installed is keyed (the others as absent).
RENDER_LIBRARIES = ("albumentations", "albucore", "opencv-python-headless", "opencv-python",
                    "opencv-contrib-python", "opencv-contrib-python-headless", "pillow", "pillow-simd", "scipy")


def augment(run: StageRun) -> tuple[dict, list[str]]:
    """Render the augmented track of every usable image, reusing each variant recorded with the same
    recipe, input bytes and render code; records batches of `augment.batch_size` images, grouped in about
    `runner.chunks_per_worker` task runs per worker on the flow's runner."""
    cfg, a, run_dir = run.cfg, run.cfg.augment, run.run_dir
    catalog = load_artifact_catalog(a.catalog)
    images = frame_plan(run.table("stages/images.parquet"), run.table("stages/facts.parquet"), load_catalog(cfg.catalog))
    # The largest image any source admits: an image over its own source's limit is quarantined already.
    settings = RenderSettings(catalog, cfg.seed, a.jpeg_quality, run_dir, max(s.max_pixels for s in cfg.sources),
                              source_digest(*RENDER_CODE))
    if not a.enabled:
        images = images.iloc[:0]
    workers = cfg.runner.n_workers if cfg.runner.kind == "dask" else a.workers or os.cpu_count() or 1
    tasks = task_count(-(-len(images) // a.batch_size), workers, cfg.runner.chunks_per_worker)
    table = run_dir / "stages/augmentations.parquet"
    bad, figures, rendered = augment_images(images, settings, table, batch_size=a.batch_size, tasks=tasks,
                                            run_chunks=run.runners.augment)
    reconcile("images through augment", len(images), figures["augmented_images"], len(bad))
    reconcile("variants", figures["augmented_images"] * len(catalog.artifacts), figures["variants"])
    log.info("augment: %d variants rendered, %d verified on disk", rendered, figures["variants"] - rendered)
    write_table(bad, run_dir / "stages/quarantine_augment.parquet")
    outputs = list(AUGMENT.outputs)
    shown = first_rows(table, a.contact_sheet_images * len(catalog.artifacts))  # the first images' variants
    sheet = contact_sheet(shown, images, run_dir, a.contact_sheet_images)
    (run_dir / CONTACT_SHEET).unlink(missing_ok=True)
    if sheet is not None:
        with atomic_path(run_dir / CONTACT_SHEET) as tmp:
            tmp.write_bytes(sheet)
        outputs.append(CONTACT_SHEET)
    return ({**figures, "by_reason": by_reason(bad), "contact_sheet": CONTACT_SHEET if sheet is not None else None},
            outputs)


def rendered_files(run: StageRun) -> list:
    """The variants and their records: each entry is reused only under its own recipe (see `RENDER_CODE`)."""
    return [run.run_dir / "augmented", run.run_dir / "augment"]


AUGMENT = Stage("augment", augment, packages=("augment",), config=("seed", "sources.max_pixels", "augment.enabled", "augment.jpeg_quality",
                                                                   "augment.contact_sheet_images"),
                tables=("stages/images.parquet", "stages/facts.parquet"),
                data=("config:augment.catalog", "config:catalog"), libraries=RENDER_LIBRARIES,
                caches=rendered_files, outputs=("stages/augmentations.parquet", "stages/quarantine_augment.parquet"))
