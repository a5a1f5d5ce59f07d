"""`kvqa export medico-task2`: the Medico 2026 subtask-2 files of a built run, cached like a stage.

Thin: the work is `explain.medico.export_task2`; this keys it on the release's shards (both configs it
reads) and the explain code, so a re-run with an unchanged release rewrites nothing.
"""

from __future__ import annotations

from pathlib import Path

from explain.medico import SUBMISSION_NAME, VAL_SET_NAME, export_task2
from flows.stage_cache import cached_stage, code_version, digests
from kvqa.errors import BadInput

EXPORT_DIR = "export/medico-task2"


def export_medico_task2(run_dir: Path) -> dict:
    """Write `<run>/export/medico-task2/` (val_set_task2/, submission_task2.jsonl, visuals/); return counts."""
    release = Path(run_dir) / "release"
    shards = sorted(str(p.relative_to(run_dir)) for folder in ("data", "explanations")
                    for p in (release / folder).glob("test-*.parquet"))
    if not any(s.startswith("release/data/") for s in shards):
        raise BadInput(f"no test split in {release}/data: build the run first (kvqa build)")
    key = {"code": code_version("explain"), "inputs": digests(Path(run_dir), *shards)}

    def build():
        out = Path(run_dir) / EXPORT_DIR
        summary = export_task2(release, out)
        files = sorted(str(p.relative_to(run_dir)) for p in out.rglob("*") if p.is_file())
        return {**summary, "folder": EXPORT_DIR, "val_set": f"{EXPORT_DIR}/{VAL_SET_NAME}",
                "submission": f"{EXPORT_DIR}/{SUBMISSION_NAME}"}, files

    return cached_stage(Path(run_dir), "medico_task2", key, build)
