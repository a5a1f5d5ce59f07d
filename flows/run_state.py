"""What a run folder remembers besides its tables (where its config is), and who may write it.

`run.json` records the config file a run was built from, so `kvqa add-class NAME --run RUN` needs no
`--config` (the classes added to a run are the plans stage's input: `generate.plans.class_additions`).
`run_lock` makes each run folder single-writer.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout

from kvqa.errors import BadInput
from kvqa.tables import remove_orphan_temps, write_json

log = logging.getLogger("kvqa")
RUN_FILE = "run.json"


def record_run(run_dir: Path, config_path: Path) -> None:
    write_json({"config": str(Path(config_path).resolve())}, Path(run_dir) / RUN_FILE)


def recorded_config(run_dir: Path) -> Path | None:
    path = Path(run_dir) / RUN_FILE
    return Path(json.loads(path.read_text())["config"]) if path.is_file() else None


class RunBusyError(BadInput):
    """Another kvqa command holds the run folder: two writers would vouch for each other's files."""


_LOCKS: dict[Path, FileLock] = {}


def lock_path(run_dir: Path) -> Path:
    """The lock file of a run folder: beside it, not in it, so the run folder holds only outputs."""
    run_dir = Path(run_dir).resolve()
    return run_dir.parent / f".{run_dir.name}.lock"


@contextmanager
def run_lock(run_dir: Path, command: str) -> Iterator[None]:
    """Hold the run folder for one kvqa command; a second command (another process) fails at once.

    Re-entrant within a process: `build_release` runs `augment_track` as a subflow and `add-class` runs
    `build_release`, each taking the lock again. The lock is an OS file lock (`filelock`), so it is
    released when the process dies, however it dies: a killed run never leaves the folder locked. Taking
    it removes the temporary files a killed run left in the folder (nothing else can be writing them).
    """
    path = lock_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = _LOCKS.setdefault(path, FileLock(path, thread_local=False, fallback_to_soft=False))
    owner = path.with_name(path.name + ".json")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        holder = json.loads(owner.read_text()) if owner.is_file() else {}
        raise RunBusyError(f"run {Path(run_dir).name!r} ({Path(run_dir).resolve()}) is in use by another kvqa "
                           f"command (pid {holder.get('pid', '?')}: {holder.get('command', '?')}); "
                           "wait for it to finish or stop it") from None
    try:
        if lock.lock_counter == 1:
            write_json({"pid": os.getpid(), "command": command}, owner)
            # The only writer now: any temporary file in the folder is a killed run's leftover.
            removed = remove_orphan_temps(run_dir)
            if removed:
                log.info("removed %d temporary files left by an interrupted run", len(removed))
        yield
    finally:
        lock.release()


def snapshot_run(run_dir: Path) -> Path:
    """Hard-link every file of the run folder into a snapshot beside it, for `restore_run`.

    Cheap whatever the run's size (no bytes are copied) and exact, because every file of a run folder is
    written to a temporary name and renamed into place, never modified in place: a later write replaces
    the run folder's link and leaves the snapshot's file as it was.
    """
    run_dir = Path(run_dir)
    snap = run_dir.parent / f".{run_dir.name}.snapshot"
    shutil.rmtree(snap, ignore_errors=True)
    for path in sorted(run_dir.rglob("*")):
        if path.is_file() and not path.is_symlink():
            target = snap / path.relative_to(run_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, target)
    return snap


def restore_run(run_dir: Path, snap: Path) -> None:
    """Put the run folder back exactly as `snapshot_run` saw it: files it did not have are removed."""
    run_dir, snap = Path(run_dir), Path(snap)
    saved = {p.relative_to(snap) for p in snap.rglob("*") if p.is_file()}
    for path in sorted(run_dir.rglob("*"), reverse=True):
        rel = path.relative_to(run_dir)
        if path.is_file() and rel not in saved:
            path.unlink()
        elif path.is_dir() and not (snap / rel).is_dir() and not any(path.iterdir()):
            path.rmdir()
    for rel in sorted(saved):
        (run_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(snap / rel, run_dir / rel)
    shutil.rmtree(snap)


def drop_snapshot(snap: Path) -> None:
    shutil.rmtree(snap, ignore_errors=True)
