"""Stages as Prefect tasks, and the runners a flow gives them: the orchestration side of `kvqa.stage`.

A stage is declared (and built) in its own package; here it becomes a Prefect task named after it, so the
task, the build function and the marker share one name. Nothing here decides an output.
"""

from __future__ import annotations

from concurrent.futures import Executor
from pathlib import Path
from typing import Any, Mapping

from prefect import task, unmapped
from prefect.cache_policies import NONE

from augment import render_chunk, run_in_processes
from augment.track import ChunkResult, RenderSettings
from kvqa.config import Config
from kvqa.stage import Runners, Stage, StageRun, run_stage

_TASKS: dict[str, Any] = {}


def stage_task(stage: Stage):
    """The Prefect task of `stage` (one per stage name, made once)."""
    if stage.name not in _TASKS:
        _TASKS[stage.name] = task(run_stage, name=stage.name, task_run_name=stage.name, cache_policy=NONE)
    return _TASKS[stage.name]


def run_as_task(stage: Stage, cfg: Config, run_dir: Path, summaries: Mapping[str, dict] | None = None,
                params: Mapping[str, Any] | None = None) -> dict:
    """Run `stage` as its Prefect task, given the summaries it declares in `after` (taken from `summaries`)
    and the flow's `params`; returns its summary."""
    summaries = summaries or {}
    given = StageRun(cfg, Path(run_dir), {n: summaries[n] for n in stage.after if n in summaries},
                     {p: (params or {})[p] for p in stage.params if p in (params or {})}, stage_runners(cfg))
    return stage_task(stage)(stage, given)


@task(cache_policy=NONE, task_run_name="augment-chunk-{index}")
def augment_chunk(chunk: list[list[dict]], index: int, settings: RenderSettings, pool: Executor) -> ChunkResult:
    return pool.submit(render_chunk, chunk, settings).result()


def map_prefect_tasks(pool: Executor, chunks: list[list[list[dict]]], settings: RenderSettings) -> list:
    """One Prefect task per chunk, each handing its chunk to the process pool."""
    return augment_chunk.map(chunks, range(len(chunks)), unmapped(settings), unmapped(pool))


def stage_runners(cfg: Config) -> Runners:
    """The runners `cfg.runner` asks for: Prefect tasks on Dask, or in this process (the augment stage's
    chunks as Prefect tasks over a local process pool, one process per core)."""
    r = cfg.runner
    if r.kind != "dask":
        return Runners(augment=run_in_processes(cfg.augment.workers, map_prefect_tasks))
    from flows.dask_runner import embed_on_dask, map_on_dask, run_on_dask  # distributed: only when asked for

    return Runners(map=lambda label, fn, chunks, *args: map_on_dask(r, label, fn, chunks, *args),
                   embed=lambda dedup, folder, vectors_id: embed_on_dask(r, dedup, folder, vectors_id),
                   augment=run_on_dask(r))
