"""`kvqa export medico-task2`: the Medico 2026 subtask-2 files of a built run, as a cached stage
(`explain.stages.MEDICO_TASK2`, which reads no config): a re-run with an unchanged release rewrites nothing."""

from __future__ import annotations

from pathlib import Path

from explain.stages import MEDICO_TASK2
from kvqa.stage import StageRun, run_stage


def export_medico_task2(run_dir: Path) -> dict:
    """Write `<run>/export/medico-task2/` (val_set_task2/, submission_task2.jsonl, visuals/); return counts."""
    return run_stage(MEDICO_TASK2, StageRun(None, Path(run_dir)))
