"""One stage contract: a declaration of what a stage reads, and the cache keyed by that declaration only.

A stage is declared once, in its own package's `stages.py`, as a `Stage`: its name (the Prefect task's, the
build function's and the marker's: `stages/<name>.done.json`), the packages whose code decides its output, the
config fields, run-folder tables, data files and folders, earlier stages' summaries and library versions it
reads, and its build function. Its cache key is derived from the declaration, never written by hand;
`tests/test_stage_keys.py` runs every build (the sample's, and the LLM path against the loopback stand-in)
under an audit hook and a trace function, and fails when it opens a file of the project, the data or the
run, reads a config field, or runs project or library code, that its declaration does not name. (What it
cannot see: files opened in C, paths those builds do not take.)

Prefect's own task caching is per flow run unless results are persisted, and its TASK_SOURCE policy does not
see helper code; here a stage is skipped when a marker written *after* its outputs records the same key and
the outputs still have the recorded digests. A killed run therefore resumes from the last finished stage,
and a re-run with anything changed (config, inputs, catalog, code, a library) redoes every stage that declares
it (code per package: an edit of a module redoes every stage whose packages hold it).
"""

from __future__ import annotations

import ast
import json
import logging
import os
import platform
import signal
import time
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import pandas as pd
from prefect.context import TaskRunContext

from kvqa.config import PROJECT_ROOT, Config
from kvqa.errors import StageFailed
from kvqa.tables import file_digest, read_table, stable_hash, write_json

log = logging.getLogger("kvqa")

# The folder whose packages hold the code a key digests (a test points it at a copy of the project).
CODE_ROOT = PROJECT_ROOT
# Top-level packages whose code can decide a stage's output. `flows` is not one of them: it only lists
# stages and orchestrates them (a lint test keeps build bodies out of it), and no stage imports it.
STAGE_PACKAGES = ("kvqa", "sources", "generate", "dedup", "augment", "publish", "explain", "review", "report")
# Distributions whose versions decide the bytes of every stage's tables: in every key.
BASE_LIBRARIES = ("numpy", "pandas", "pyarrow", "pydantic", "pyyaml")
# Distributions that move, log or schedule bytes and never decide them, with everything they require (the
# resolver may add a dependency to them any day: `non_deciding_libraries`): in no key, unless a stage names
# one. Named here (not in a test) because leaving a library out of every key is a decision of this contract.
NON_DECIDING_ROOTS = ("prefect", "prefect-dask", "dask", "distributed", "openai", "huggingface-hub", "fsspec",
                      "tqdm", "filelock", "typer", "dill", "multiprocess", "xxhash", "threadpoolctl")
# Config fields that decide how a stage runs, never what it writes (every runner and worker count gives the
# same bytes: tests/test_dask_runner.py, tests/test_augment.py; `output_root` says where the caches are):
# read by builds, in no key.
HOW_NOT_WHAT = ("runner", "output_root", "augment.workers", "augment.batch_size")


@dataclass(frozen=True)
class Runners:
    """How a build fans its work out, given by the flow (orchestration) from `runner`; in no key, because
    every runner gives the same bytes (tested). None: in this process.

    - `map(label, fn, chunks, *args)`: the results of `fn(chunk, *args)` per chunk, in chunk order (Dask);
    - `embed`: `dedup.embed.BlockRunner` factory `(dedup_config, cache_folder, vectors_id)` (Dask);
    - `augment`: `augment.ChunkRunner` for the augment stage's records batches (Prefect tasks over a local
      process pool, or Dask).
    """

    map: Callable | None = None
    embed: Callable | None = None
    augment: Callable | None = None


@dataclass(frozen=True)
class StageRun:
    """What a build is given: the config, the run folder, the summaries of the stages it declares in `after`
    and the values it declares in `params` (both in its key), and the flow's runners (in no key). `cfg` is
    None for a stage that reads no config (an export of a built release)."""

    cfg: Config | None
    run_dir: Path
    summaries: Mapping[str, dict] = field(default_factory=dict)
    params: Mapping[str, Any] = field(default_factory=dict)
    runners: Runners = Runners()

    def table(self, rel: str) -> pd.DataFrame:
        return read_table(self.run_dir / rel)


Build = Callable[[StageRun], tuple[dict, list[str]]]


@dataclass(frozen=True)
class Stage:
    """A pipeline stage, declared: everything its output depends on, and how to build it.

    - `packages`: the stage packages whose code decides the output (with, transitively, those they import).
    - `config`: dotted config fields read (`"plans"`, `"seed"`, `"publish.max_shard_bytes"`); `unkeyed`: fields
      inside those that only decide whether the flow rejects the run after the stage, never its output.
    - `tables`: run-folder files read (an absent one is keyed as absent); `run_inputs`: those only known at run
      time (release shards), run-relative strings or absolute paths.
    - `data`: data files or folders read, each a path relative to the project (`"prompts/llm/compose.yaml"`) or
      `"config:<field>"` for paths the config names (`"config:catalog"`, `"config:sources.label_files"`); a
      folder's key is every file in it. `listings`: folders keyed by names, sizes and modification times only
      (image folders: their content digests go into the stage's table).
    - `after`: earlier stages whose summaries the build reads; `params`: values the flow passes.
    - `libraries`: distributions whose versions decide the output, besides `BASE_LIBRARIES`.
    - `caches`: folders the build reads and writes whose entries carry their own keys (request and
      embedding caches, per-variant records): never in the key, allowed to the build.
    - `outputs`: the files every build writes (a build may write more: shards), checked after it.
    - `redo`: given the marker's summary, a reason to build again although the key is the same.
    - `rejection`: given the config and the stage's summary, why the flow rejects the run after it (too many
      rows rejected), if it does; the config fields it reads are `unkeyed`.
    """

    name: str
    build: Build
    packages: tuple[str, ...]
    config: tuple[str, ...] = ()
    unkeyed: tuple[str, ...] = ()
    tables: tuple[str, ...] = ()
    run_inputs: Callable[[StageRun], Iterable[str | Path]] | None = None
    data: tuple[str, ...] = ()
    listings: tuple[str, ...] = ()
    after: tuple[str, ...] = ()
    params: tuple[str, ...] = ()
    libraries: tuple[str, ...] = ()
    caches: Callable[[StageRun], Iterable[Path]] | None = None
    outputs: tuple[str, ...] = ()
    redo: Callable[[dict], str | None] | None = None
    rejection: Callable[[Config, dict], str | None] | None = None

    def __post_init__(self):
        if self.build.__name__ != self.name:
            raise ValueError(f"stage {self.name!r}: its build function is named {self.build.__name__!r}; "
                             "one name per stage (task, function, marker)")
        unknown = set(self.packages) - set(STAGE_PACKAGES)
        if unknown:
            raise ValueError(f"stage {self.name!r}: {sorted(unknown)} are not stage packages")


@lru_cache(maxsize=None)
def _imported_packages(root: Path, package: str) -> frozenset[str]:
    """The stage packages that `package`'s modules import (directly)."""
    found = set()
    for path in (root / package).rglob("*.py"):
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
            todo.extend(_imported_packages(CODE_ROOT, pkg))
    return sorted(seen)


def code_files(*packages: str) -> list[Path]:
    """Every .py file a stage can run: the named packages and, transitively, every stage package they import."""
    return sorted(p for pkg in stage_packages(*packages) for p in (CODE_ROOT / pkg).rglob("*.py"))


def code_version(*packages: str) -> str:
    """A digest of `code_files(*packages)` (a change to a helper in another package redoes the stage too)."""
    return stable_hash(*(f"{p.relative_to(CODE_ROOT)}:{file_digest(p)}" for p in code_files(*packages)))[:16]


@lru_cache(maxsize=None)
def non_deciding_libraries() -> frozenset[str]:
    """`NON_DECIDING_ROOTS` and, transitively, the installed distributions they require (markers evaluated,
    extras not followed), less `BASE_LIBRARIES`; what the stage-contract test lets a build run unkeyed (a
    stage's own `libraries` are keyed whatever this says)."""
    from packaging.requirements import Requirement

    todo, seen = list(NON_DECIDING_ROOTS), set()
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for line in requires:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return frozenset(seen - set(BASE_LIBRARIES))


def source_digest(*files: str) -> str:
    """A digest of project files (paths relative to the project): for reuse finer than a stage's key."""
    return stable_hash(*(f"{f}:{file_digest(CODE_ROOT / f)}" for f in files))[:16]


def library_versions(*distributions: str) -> dict[str, str | None]:
    """Installed versions (None: not installed, which is a fact about the output too)."""
    out = {}
    for d in distributions:
        try:
            out[d] = metadata.version(d)
        except metadata.PackageNotFoundError:
            out[d] = None
    return out


def config_value(cfg: Config, dotted: str) -> Any:
    """A config field by its dotted name; through a list (`sources.max_pixels`) the field of every item
    (None where an item's kind has no such field)."""
    value: Any = cfg
    for part in dotted.split("."):
        value = ([getattr(v, part, None) for v in value] if isinstance(value, list) else getattr(value, part))
    return value


def _dump(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if isinstance(value, (list, tuple)):
        return [_dump(v) for v in value]
    return value if isinstance(value, (int, float, str, bool, type(None), dict)) else str(value)


def config_part(stage: Stage, cfg: Config) -> dict[str, Any]:
    out = {p: _dump(config_value(cfg, p)) for p in stage.config}
    for dotted in stage.unkeyed:
        section = next((p for p in stage.config if dotted.startswith(p + ".")), None)
        if section is None:
            raise ValueError(f"stage {stage.name!r}: unkeyed {dotted!r} is not inside a declared config section")
        *path, leaf = dotted[len(section) + 1:].split(".")
        node = out[section]
        for part in path:
            node = node[part]
        node.pop(leaf)
    return out


def data_paths(entry: str, cfg: Config) -> list[Path]:
    """The files or folders a `data` / `listings` entry names (see `Stage`)."""
    if not entry.startswith("config:"):
        return [CODE_ROOT / entry]
    value = config_value(cfg, entry[len("config:"):])
    flat = [v for item in (value if isinstance(value, list) else [value])
            for v in (item if isinstance(item, (list, tuple)) else [item])]
    return [Path(v) for v in flat if v is not None]


def path_digest(path: Path) -> str | None:
    """A file's digest, a folder's (every file in it, by relative path), or None when it does not exist."""
    if path.is_dir():
        return stable_hash(*(f"{p.relative_to(path)}:{file_digest(p)}" for p in sorted(path.rglob("*"))
                             if p.is_file()))
    return file_digest(path) if path.is_file() else None


def listing_digest(path: Path) -> str:
    """Names, sizes and modification times of a folder's files: a cheap key for folders of images."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
    stats = ((p, p.stat()) for p in files)  # one stat per file: image folders hold 100k files
    return stable_hash(*(f"{p.relative_to(path)}/{st.st_size}/{st.st_mtime_ns}" for p, st in stats))


def run_input_paths(stage: Stage, run: StageRun) -> list[Path]:
    extra = list(stage.run_inputs(run)) if stage.run_inputs else []
    return [run.run_dir / t for t in stage.tables] + [p if isinstance(p, Path) else run.run_dir / p for p in extra]


def stage_key(stage: Stage, run: StageRun) -> dict:
    """The key of `stage` for this run: every part of its declaration, resolved."""
    missing = [n for n in stage.after if n not in run.summaries] + [p for p in stage.params if p not in run.params]
    if missing:
        raise ValueError(f"stage {stage.name!r} needs {missing}, which the flow did not pass")
    inputs = run_input_paths(stage, run)
    return {
        "stage": stage.name,
        "code": code_version(*stage.packages),
        "config": config_part(stage, run.cfg),
        "inputs": {(str(p.relative_to(run.run_dir)) if p.is_relative_to(run.run_dir) else str(p)): path_digest(p)
                   for p in inputs},
        "data": {e: [path_digest(p) for p in data_paths(e, run.cfg)] for e in stage.data},
        "listings": {e: [listing_digest(p) for p in data_paths(e, run.cfg)] for e in stage.listings},
        "after": {n: run.summaries[n] for n in stage.after},
        "params": {p: run.params[p] for p in stage.params},
        "libraries": {"python": platform.python_version(), **library_versions(*BASE_LIBRARIES, *stage.libraries)},
    }


def key_digest(key: dict) -> str:
    return stable_hash(json.dumps(key, sort_keys=True, default=str))


def run_stage(stage: Stage, run: StageRun) -> dict:
    """Build `stage` unless a marker with the same key exists, its outputs are intact and `stage.redo`, given
    the marker's summary, says nothing. Returns the summary, from the marker when the stage is skipped."""
    run_dir = run.run_dir
    marker = run_dir / "stages" / f"{stage.name}.done.json"
    digest = key_digest(stage_key(stage, run))
    if marker.is_file():
        done = json.loads(marker.read_text())
        if done.get("key") == digest and all(
            (run_dir / out).is_file() and file_digest(run_dir / out) == sha
            for out, sha in done.get("outputs", {}).items()
        ):
            why = stage.redo(done["summary"]) if stage.redo is not None else None
            if why is None:
                log.info("stage %-9s cached (key %s)", stage.name, digest[:12])
                return done["summary"]
            log.info("stage %-9s redone: %s", stage.name, why)
    started = time.time()
    try:
        summary, outputs = stage.build(run)
    except OSError as err:  # a full disk, a permission: one line naming the stage, and what it had written
        raise StageFailed(stage.name, err, bytes_written_since(run_dir, started), run_dir) from err
    if os.environ.get("KVQA_KILL_AFTER_STAGE") == stage.name:
        # Fault injection for the kill-and-resume tests: die with SIGKILL at the worst moment, after the
        # stage's outputs are written and before its marker says so.
        os.kill(os.getpid(), signal.SIGKILL)
    not_returned = [o for o in stage.outputs if o not in outputs]
    missing = [o for o in outputs if not (run_dir / o).is_file()]
    if missing or not_returned:
        raise RuntimeError(f"stage {stage.name} did not write {missing or not_returned}")
    write_json({"key": digest, "outputs": {o: file_digest(run_dir / o) for o in outputs}, "summary": summary,
                "prefect": prefect_task_run()}, marker)
    log.info("stage %-9s done: %s", stage.name, json.dumps(summary, sort_keys=True)[:200])
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
