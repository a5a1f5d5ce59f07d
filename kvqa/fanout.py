"""How fan-out work is cut into task runs: bounded by the workers, not by the items.

Used by every stage whose work is mapped over chunks (the augmented track, the image inventory), for the
local runner and for Dask alike. A task run costs a Prefect API round trip and, on the local runner, a
thread; 100,000 images in chunks of 8 made 12,500 of them. Here a stage asks for about
`chunks_per_worker` chunks per worker: enough to balance a slow chunk and to move a progress bar, few
enough that the count does not grow with the data.
"""

from __future__ import annotations

from typing import TypeVar

T = TypeVar("T")


def task_count(n_units: int, workers: int, chunks_per_worker: int) -> int:
    """Task runs for `n_units` units of work: `workers x chunks_per_worker`, never more than the units."""
    return min(n_units, workers * chunks_per_worker)


def contiguous_chunks(items: list[T], n_chunks: int) -> list[list[T]]:
    """`items` in order, cut into `n_chunks` runs whose lengths differ by at most one (none when empty)."""
    if not items:
        return []
    n_chunks = max(1, min(n_chunks, len(items)))
    size, extra = divmod(len(items), n_chunks)
    bounds = [i * size + min(i, extra) for i in range(n_chunks + 1)]
    return [items[bounds[i]:bounds[i + 1]] for i in range(n_chunks)]
