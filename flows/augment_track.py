"""The `augment_track` Prefect flow: usable images -> ten weakly augmented variants each.

`build_release` runs the augment stage (`augment.stages.AUGMENT`) through this flow as a sub-flow; alone
(`kvqa augment`), the flow runs the input stages it needs first.
"""

from __future__ import annotations

import logging
from pathlib import Path

from prefect import flow

from augment.stages import AUGMENT
from flows.run_state import run_lock
from flows.steps import run_as_task
from kvqa.config import load_config
from sources.stages import IMAGES, SOURCES

log = logging.getLogger("kvqa")


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
            for stage in (SOURCES, IMAGES):
                run_as_task(stage, cfg, run_dir)
        summary = run_as_task(AUGMENT, cfg, run_dir)
        log.info("augmented track: %d of %d images, %d variants in %s", summary["augmented_images"],
                 summary["images"], summary["variants"], run_dir / "augmented")
        return summary
