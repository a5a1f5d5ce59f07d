"""Cross-run stage caching keyed by code version, stage config and input digests.

Prefect's own task caching is per flow run unless results are persisted, and its TASK_SOURCE policy does
not see helper code; here a stage is skipped when a marker written *after* its outputs records the same key
and the outputs still have the recorded digests. A killed run therefore resumes from the last finished
stage, and a re-run with anything changed (config, inputs, catalog, code) redoes exactly what depends on it.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import signal
import time
from functools import lru_cache
from pathlib import Path
from typing import Callable

from prefect.context import TaskRunContext

from kvqa.config import PROJECT_ROOT
from kvqa.errors import StageFailed
from kvqa.tables import file_digest, stable_hash, write_json

log = logging.getLogger("kvqa")


# Top-level packages whose code can decide a stage's output. `flows` is not one of them: it only
# orchestrates (a stage never imports it), so editing the CLI or a flow's wiring redoes nothing.
STAGE_PACKAGES = ("kvqa", "sources", "generate", "dedup", "augment", "publish", "explain", "review", "report")


@lru_cache(maxsize=None)
def _imported_packages(package: str) -> frozenset[str]:
    """The stage packages that `package`'s modules import (directly)."""
    found = set()
    for path in (PROJECT_ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
            found |= {n.split(".")[0] for n in names} & set(STAGE_PACKAGES)
    return frozenset(found)


def stage_packages(*packages: str) -> list[str]:
    """The named packages and every stage package they import, transitively (always `kvqa`)."""
    todo, seen = ["kvqa", *packages], set()
    while todo:
        pkg = todo.pop()
        if pkg not in seen:
            seen.add(pkg)
            todo.extend(_imported_packages(pkg))
    return sorted(seen)


def code_version(*packages: str) -> str:
    """A digest of every .py file a stage can run: the named packages and, transitively, every stage
    package they import (so a change to a helper in another package redoes the stage too)."""
    files = sorted(p for pkg in stage_packages(*packages) for p in (PROJECT_ROOT / pkg).rglob("*.py"))
    return stable_hash(*(f"{p.relative_to(PROJECT_ROOT)}:{file_digest(p)}" for p in files))[:16]


def cached_stage(run_dir: Path, name: str, key: dict, build: Callable[[], tuple[dict, list[str]]],
                 redo: Callable[[dict], str | None] | None = None) -> dict:
    """Run `build` unless a marker with the same key exists and its outputs are intact (and `redo`, given
    the marker's summary, says nothing: e.g. LLM requests that failed in transport, sent again).

    `build` writes its files and returns (summary, output paths relative to run_dir). Returns the summary,
    from the marker when the stage is skipped.
    """
    marker = run_dir / "stages" / f"{name}.done.json"
    digest = stable_hash(json.dumps(key, sort_keys=True, default=str))
    if marker.is_file():
        done = json.loads(marker.read_text())
        if done.get("key") == digest and all(
            (run_dir / out).is_file() and file_digest(run_dir / out) == sha
            for out, sha in done.get("outputs", {}).items()
        ):
            why = redo(done["summary"]) if redo is not None else None
            if why is None:
                log.info("stage %-9s cached (key %s)", name, digest[:12])
                return done["summary"]
            log.info("stage %-9s redone: %s", name, why)
    started = time.time()
    try:
        summary, outputs = build()
    except OSError as err:  # a full disk, a permission: one line naming the stage, and what it had written
        raise StageFailed(name, err, bytes_written_since(run_dir, started), run_dir) from err
    if os.environ.get("KVQA_KILL_AFTER_STAGE") == name:
        # Fault injection for the kill-and-resume tests: die with SIGKILL at the worst moment, after the
        # stage's outputs are written and before its marker says so.
        os.kill(os.getpid(), signal.SIGKILL)
    missing = [o for o in outputs if not (run_dir / o).is_file()]
    if missing:
        raise RuntimeError(f"stage {name} did not write {missing}")
    write_json({"key": digest, "outputs": {o: file_digest(run_dir / o) for o in outputs}, "summary": summary,
                "prefect": prefect_task_run()}, marker)
    log.info("stage %-9s done: %s", name, json.dumps(summary, sort_keys=True)[:200])
    return summary


def failed_requests_redo(summary: dict) -> str | None:
    """`redo` of the LLM stages: requests that failed in transport (server down, timeouts) are never
    cached, so redoing the stage sends exactly those again; every other reply comes from the cache."""
    failed = summary.get("failed_requests", 0)
    return f"{failed} LLM request(s) failed in transport last time: sending them again" if failed else None


def prefect_task_run() -> dict | None:
    """The Prefect task run this stage ran in (its logs and timings are there), or None outside one: every
    stage of a flow is its own task, so None in a marker written by a flow is a wiring mistake."""
    ctx = TaskRunContext.get()
    if ctx is None:
        return None
    return {"task": ctx.task.name, "task_run": str(ctx.task_run.id), "flow_run": str(ctx.task_run.flow_run_id)}


def bytes_written_since(folder: Path, since: float) -> int:
    """Bytes of the files under `folder` modified since `since` (what a failed stage had finished)."""
    total = 0
    for path in Path(folder).rglob("*"):
        try:
            st = path.stat()
        except OSError:
            continue
        if path.is_file() and st.st_mtime >= since:
            total += st.st_size
    return total


def digests(run_dir: Path, *names: str) -> dict[str, str]:
    return {n: file_digest(run_dir / n) for n in names}
