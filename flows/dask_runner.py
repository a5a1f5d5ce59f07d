"""`runner: {kind: dask}`: the fan-out work of a stage as Prefect task runs on `prefect_dask.DaskTaskRunner`.

The chunks run in a sub-flow whose task runner is Dask: an existing cluster when `runner.address` names
its scheduler (Kubernetes, Slurm via dask-jobqueue, Coiled...), else a `LocalCluster` of `n_workers`
single-threaded worker processes, started for the sub-flow and torn down after it. One task run per
chunk; stages cut their work into chunks with `kvqa.fanout` (about `chunks_per_worker` per worker), so
100k images make at most `n_workers x chunks_per_worker` task runs. Every item is seeded by its own key,
and embeddings are encoded in blocks cut before the fan-out (`dedup.embed.text_blocks`), so the output
does not depend on which worker did it (byte-identical to the local runner).

The chunks reach the sub-flow through a closure, not as flow parameters: Prefect stores a flow run's
parameters in its database, and 100k images' rows are no business of the API.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Sequence

from prefect import flow, task, unmapped
from prefect.cache_policies import NONE
from tqdm.auto import tqdm

from augment.track import ChunkResult, ChunkRunner, RenderSettings, one_opencv_thread, render_chunk
from dedup.embed import BlockRunner, encode_blocks_on_worker
from kvqa.config import DedupConfig, RunnerConfig
from kvqa.fanout import contiguous_chunks, task_count

log = logging.getLogger("kvqa")


def prefect_api_url() -> str:
    """The API this process's flow runs report to: PREFECT_API_URL, or the temporary server Prefect started."""
    from prefect import get_client

    with get_client(sync_client=True) as client:
        return str(client.api_url)


def dask_task_runner(runner: RunnerConfig):
    """The Prefect task runner for `runner`: the cluster at `address`, else a fresh LocalCluster.

    The task runs execute on the workers and report to Prefect from there, so the workers need the flow's
    API. A LocalCluster's workers get it in their environment; without it each worker started a temporary
    Prefect server of its own (≈9 s of CPU each) and the task runs were recorded there, not beside their
    flow. An existing cluster's workers need PREFECT_API_URL set to a server they can reach (README)."""
    from prefect_dask import DaskTaskRunner  # imported only when asked for: distributed is slow to import

    if runner.address:
        if not os.environ.get("PREFECT_API_URL"):
            log.warning("runner.address is set but PREFECT_API_URL is not: the cluster's workers cannot "
                        "report their task runs to this command's temporary Prefect server")
        return DaskTaskRunner(address=runner.address)
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=local_cluster_kwargs(runner.n_workers))


def local_cluster_kwargs(n_workers: int) -> dict:
    """`distributed.LocalCluster`'s arguments for `n_workers` single-threaded worker processes that report
    their task runs to this process's Prefect API."""
    return {"n_workers": n_workers, "threads_per_worker": 1, "processes": True, "dashboard_address": None,
            "env": {"PREFECT_API_URL": prefect_api_url()}}


@task(cache_policy=NONE, task_run_name="{label}-{index}")
def run_chunk_task(fn: Callable, chunk: Any, index: int, label: str, args: tuple) -> Any:
    one_opencv_thread()  # as the local pool's workers: the same bytes whichever runner rendered them
    return fn(chunk, *args)


def map_on_dask(runner: RunnerConfig, label: str, fn: Callable, chunks: Sequence, *args) -> list:
    """`[fn(chunk, *args) for chunk in chunks]`, one Prefect task run per chunk on Dask, in order."""
    if not chunks:
        return []
    where = runner.address or f"LocalCluster of {runner.n_workers} workers"
    log.info("%s: %d chunks as Prefect tasks on Dask (%s)", label, len(chunks), where)

    @flow(name=f"{label}-on-dask", task_runner=dask_task_runner(runner))
    def fan_out() -> list:
        futures = run_chunk_task.map(unmapped(fn), list(chunks), range(len(chunks)), unmapped(label),
                                     unmapped(args))
        with tqdm(total=len(futures), desc=label, unit="chunk", mininterval=1.0) as bar:
            results = []
            for future in futures:  # in order: the bar moves as the chunks in front finish
                results.append(future.result())
                bar.update(1)
        return results

    with environment_kept():
        return fan_out()


@contextmanager
def environment_kept():
    """Undo what starting a LocalCluster does to this process's environment. distributed's Nanny writes its
    `pre-spawn-environ` (OMP_NUM_THREADS=1, MKL_NUM_THREADS=1, OPENBLAS_NUM_THREADS=1,
    MALLOC_TRIM_THRESHOLD_) into the *parent's* `os.environ` before it spawns a worker, and leaves it there:
    every library of the flow's process that reads them later (torch and faiss at their first use) and every
    process it starts afterwards ran on one thread. Measured: the flow-side embedding of `benchmarks/scale.py`
    after a LocalCluster took 62 s instead of 34 s."""
    import dask

    names = set(dask.config.get("distributed.nanny.pre-spawn-environ", default={}))
    before = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def run_on_dask(runner: RunnerConfig) -> ChunkRunner:
    """A chunk runner (`augment_images(run_chunks=...)`) that renders the chunks on Dask."""
    def run(chunks: list[list[list[dict]]], settings: RenderSettings) -> list[ChunkResult]:
        return map_on_dask(runner, "augment", render_chunk, chunks, settings)
    return run


def embed_on_dask(runner: RunnerConfig, dedup: DedupConfig, cache_folder: Path | None, vectors_id: str) -> BlockRunner:
    """A block runner (`dedup.embed_texts(run_blocks=...)`) that encodes the blocks on Dask: runs of
    consecutive blocks, about `chunks_per_worker` per worker, each worker loading the model once and storing
    its blocks in `cache_folder`. The blocks are cut before (`dedup.embed.text_blocks`), so the vectors are
    those the flow's process would encode (`vectors_id`, checked by each worker)."""
    def run(blocks: list[list[str]]) -> list:
        chunks = contiguous_chunks(blocks, task_count(len(blocks), runner.n_workers, runner.chunks_per_worker))
        return [v for part in map_on_dask(runner, "embed", encode_blocks_on_worker, chunks, dedup, cache_folder,
                                          vectors_id) for v in part]
    return run
