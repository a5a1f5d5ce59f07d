"""A build stops within seconds on SIGTERM, Ctrl-C or SIGKILL, and takes every process it started with it
(Prefect's temporary server, the augment pool); the next run removes what the kill left and ends
byte-identical."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import ROOT, tree_digests


def _marked_processes(mark: str) -> list[int]:
    """Pids of live processes whose environment holds the mark (every process a command starts inherits it)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if mark.encode() in (proc / "environ").read_bytes():
                    stat = (proc / "stat").read_text()
                    if stat.rsplit(")", 1)[1].split()[0] != "Z":  # zombies are dead
                        found.append(int(proc.name))
            except OSError:
                continue
    return found


def _start_build(root: Path, mark: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "KVQA_STOP_TEST_MARK": mark, "PYTHONUNBUFFERED": "1"}
    env.pop("PREFECT_API_URL", None)  # this test is about the temporary server a build starts (conftest)
    return subprocess.Popen([sys.executable, "-m", "flows.cli", "build", "--output-root", str(root)], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=open(log, "w"), start_new_session=True)


def _wait_for(log: Path, text: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while text not in log.read_text():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < end, f"{text!r} not seen:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to find the build's processes")
@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])  # SIGINT takes the SIGTERM path
def test_a_stopped_build_takes_its_processes_with_it(sample_run, tmp_path, how):
    mark = uuid.uuid4().hex
    log = tmp_path / "build.log"
    proc = _start_build(tmp_path / "runs", mark, log)
    try:
        # Stop it inside the augment stage, while the process pool renders and the server runs.
        _wait_for(log, "stage images    done", proc)
        time.sleep(1.0)
        assert len(_marked_processes(mark)) >= 3  # the command, its worker, the temporary server (+ pool)
        os.kill(proc.pid, how)
        proc.wait(timeout=15)
        end = time.monotonic() + 15
        while _marked_processes(mark) and time.monotonic() < end:
            time.sleep(0.2)
        assert _marked_processes(mark) == []
        assert proc.returncode == -how
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
        for pid in _marked_processes(mark):
            os.kill(pid, signal.SIGKILL)
    run = tmp_path / "runs" / "sample"
    assert not (run / "report.json").exists()
    if how != signal.SIGKILL:
        return  # resuming is the same after either; once is enough
    again = subprocess.run([sys.executable, "-m", "flows.cli", "build", "--output-root", str(tmp_path / "runs")],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert not [p for p in run.rglob("*.tmp")]  # what the kill left was removed
    expected = {k: v for k, v in tree_digests(sample_run).items() if not k.startswith("export/")}
    assert {k: v for k, v in tree_digests(run).items() if not k.startswith("export/")} == expected
