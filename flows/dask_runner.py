"""`runner: {kind: dask}`: the fan-out work of a flow as Prefect tasks on `prefect_dask.DaskTaskRunner`.

The chunks run in a sub-flow whose task runner is Dask: an existing cluster when `runner.address` names
its scheduler (Kubernetes, Slurm via dask-jobqueue, Coiled...), else a `LocalCluster` of `n_workers`
single-threaded worker processes, started for the sub-flow and torn down after it. One task run per
chunk, and chunks are sized from the work and the workers (`augment.track.sized_chunk`), so 100k images
make at most `n_workers x chunks_per_worker` task runs. Every chunk is seeded per image and variant, so
the output does not depend on which worker rendered it (byte-identical to the local runner).
"""

from __future__ import annotations

import logging
from typing import Callable

from prefect import flow, task, unmapped
from prefect.cache_policies import NONE

from augment.track import ChunkResult, RenderSettings, one_opencv_thread, render_chunk
from kvqa.config import RunnerConfig

log = logging.getLogger("kvqa")


def dask_task_runner(runner: RunnerConfig):
    """The Prefect task runner for `runner`: the cluster at `address`, else a fresh LocalCluster."""
    from prefect_dask import DaskTaskRunner  # imported only when asked for: distributed is slow to import

    if runner.address:
        return DaskTaskRunner(address=runner.address)
    return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                          cluster_kwargs={"n_workers": runner.n_workers, "threads_per_worker": 1,
                                          "processes": True, "dashboard_address": None})


@task(cache_policy=NONE, task_run_name="augment-chunk-{index}")
def render_chunk_task(chunk: list[dict], index: int, settings: RenderSettings) -> ChunkResult:
    one_opencv_thread()  # as the local pool's workers: the same bytes whichever runner rendered them
    return render_chunk(chunk, settings)


@flow(name="augment_chunks", log_prints=True)
def augment_chunks(chunks: list[list[dict]], settings: RenderSettings) -> list[ChunkResult]:
    """One task run per chunk on the flow's task runner (set by `run_on_dask`)."""
    futures = render_chunk_task.map(chunks, range(len(chunks)), unmapped(settings))
    return [f.result() for f in futures]


def run_on_dask(runner: RunnerConfig) -> Callable[[list[list[dict]], RenderSettings], list[ChunkResult]]:
    """A chunk runner (`augment_images(run_chunks=...)`) that renders the chunks on Dask."""
    def run(chunks: list[list[dict]], settings: RenderSettings) -> list[ChunkResult]:
        if not chunks:
            return []
        log.info("augment: %d chunks as Prefect tasks on Dask (%s)", len(chunks),
                 runner.address or f"LocalCluster of {runner.n_workers} workers")
        return augment_chunks.with_options(task_runner=dask_task_runner(runner))(chunks, settings)
    return run
