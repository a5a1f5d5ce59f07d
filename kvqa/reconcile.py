"""Counts and id sets that must add up between stages: a mismatch is a bug and stops the run."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import pandas as pd

from kvqa.tables import read_table, write_table

# Every stage's quarantine table, in stage order: a run rejected after a stage reports a prefix.
QUARANTINE_FILES = ["stages/quarantine_sources.parquet", "stages/quarantine_generate.parquet",
                    "stages/quarantine_images.parquet", "stages/quarantine_augment.parquet",
                    "stages/quarantine_publish.parquet", "stages/quarantine_explain.parquet",
                    "stages/quarantine_review.parquet"]


class ReconciliationError(RuntimeError):
    """Counts that must add up did not: rows were lost or invented between stages."""


def reconcile(what: str, total: int, *parts: int) -> None:
    if total != sum(parts):
        raise ReconciliationError(f"{what}: {total} in, {' + '.join(map(str, parts))} = {sum(parts)} out")


def reconcile_ids(what: str, total: Iterable, *parts: Iterable) -> None:
    """Every id in, in exactly one part out: two errors whose counts cancel out cannot pass."""
    total, parts = set(total), [list(p) for p in parts]
    out = [i for p in parts for i in p]
    twice = len(out) - len(set(out))
    if set(out) != total or twice:
        missing, extra = sorted(map(str, total - set(out)))[:3], sorted(map(str, set(out) - total))[:3]
        raise ReconciliationError(f"{what}: {len(total)} in, {' + '.join(str(len(p)) for p in parts)} out; "
                                  f"missing {missing}, unknown {extra}, {twice} in two parts")


def by_reason(q: pd.DataFrame) -> dict[str, int]:
    return {str(k): int(v) for k, v in q["reason"].value_counts().sort_index().items()}


def run_quarantine(run_dir: Path, quarantine_files: list[str] = QUARANTINE_FILES) -> pd.DataFrame:
    """The given stages' quarantine tables, in stage order, as one table."""
    return pd.concat([read_table(Path(run_dir) / f) for f in quarantine_files], ignore_index=True)


def write_run_quarantine(run_dir: Path, quarantine_files: list[str] = QUARANTINE_FILES) -> tuple[pd.DataFrame, dict]:
    """`quarantine.parquet`: the given stages' quarantine tables as one; returns it and its counts by stage
    and reason (`report.json`'s `quarantine`)."""
    quarantine = run_quarantine(run_dir, quarantine_files)
    write_table(quarantine, Path(run_dir) / "quarantine.parquet")
    return quarantine, {"total": len(quarantine),
                        "by_stage_reason": {f"{s}/{r}": int(n) for (s, r), n in
                                            quarantine.groupby(["stage", "reason"]).size().items()}}
