"""Shared fixtures. Real label files are read from ../shared/data (CI has it beside the checkout)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
REAL_CSV = SHARED / "kvasir-vqa" / "metadata-sample.csv"
SAMPLE_DIR = ROOT / "data" / "sample"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# One question-embedding cache for every build of the session, whatever its output root: the flow tests
# build the sample a dozen times, and embedding is keyed by text, so only the first build pays for it.
os.environ.setdefault("KVQA_EMBED_CACHE", tempfile.mkdtemp(prefix="kvqa-embed-cache-"))


# The suite must end in the process that started it. An in-process `kvqa build` (typer's CliRunner)
# without KVQA_NO_SUPERVISOR forks the test process (flows/supervise.py): the rest of the suite then ran in
# the child, passed, and hung at exit in it.
SESSION_PID = os.getpid()


def pytest_sessionfinish(session):
    if os.getpid() != SESSION_PID:
        print(f"\nthe test session ended in process {os.getpid()}, a fork of {SESSION_PID}: a test ran a `kvqa` "
              "command in this process without KVQA_NO_SUPERVISOR=1", file=sys.stderr)
        session.exitstatus = pytest.ExitCode.INTERNAL_ERROR


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# One Prefect server for the whole session, started by the `prefect_server` fixture below. Without
# PREFECT_API_URL every `kvqa` command starts Prefect's temporary server, which costs 8-30 s of the ~50
# commands the suite runs; the flows themselves run the same against either. Set here, at import, so
# that every later import of prefect (in this process and in the commands it starts) sees it.
# tests/test_stop.py removes it again: it checks that a build takes its temporary server with it.
# KVQA_TEST_TEMPORARY_PREFECT=1 keeps the per-command temporary server throughout.
SHARED_PREFECT = not os.environ.get("KVQA_TEST_TEMPORARY_PREFECT") and "PREFECT_API_URL" not in os.environ
if SHARED_PREFECT:
    os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{_free_port()}/api"


@pytest.fixture(scope="session", autouse=True)
def prefect_server(tmp_path_factory):
    """Start the session's Prefect server (see SHARED_PREFECT) in its own process group; stop it after."""
    if not SHARED_PREFECT:
        yield None
        return
    url = os.environ["PREFECT_API_URL"]
    home = tmp_path_factory.mktemp("prefect-home")
    log = open(home / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
         "--port", url.rsplit(":", 1)[1].split("/")[0]],
        env={**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": ""},
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the test Prefect server did not start: see {home / 'server.log'}")
                time.sleep(0.5)
        yield url
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(server.pid, signal.SIGKILL)
        log.close()


@pytest.fixture(scope="session")
def real_csv() -> Path:
    if not REAL_CSV.is_file():
        pytest.skip(f"real Kvasir-VQA labels not found at {REAL_CSV} (../shared/data is absent)")
    return REAL_CSV


@pytest.fixture(scope="session")
def catalog():
    from kvqa.catalog import load_catalog

    return load_catalog()


def write_config(path: Path, csv: Path, images: Path, run_name: str = "t", **extra) -> Path:
    import yaml

    cfg = {"run_name": run_name, "seed": 42, "output_root": str(path.parent / "runs"),
           "sources": [{"kind": "kvasir_vqa", "name": "kvasir-vqa", "metadata_csv": str(csv),
                        "image_dir": str(images)}], **extra}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def copy_sample(dest: Path) -> tuple[Path, Path]:
    """A private copy of the embedded sample that a test may corrupt."""
    shutil.copytree(SAMPLE_DIR, dest)
    return dest / "metadata.csv", dest / "images"


@contextmanager
def kvqa_process(*args: str, env: dict | None = None):
    """The real `kvqa` CLI (and so the real Prefect flow) started in a fresh process group; yields the
    Popen, whose output goes to files, not pipes. Leaving the block reads the output into a
    CompletedProcess (`.result`) and kills the group: a run killed with SIGKILL leaves Prefect's temporary
    server orphaned, and it would otherwise hold the pipes (and the test) open."""
    full_env = {**os.environ, **(env or {})}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        popen = subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=full_env,
                                 stdout=out, stderr=err, text=True, start_new_session=True)
        try:
            yield popen
        finally:
            try:
                os.killpg(popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            out.seek(0)
            err.seek(0)
            popen.result = subprocess.CompletedProcess(popen.args, popen.returncode, out.read(), err.read())


def run_cli(*args: str, env: dict | None = None, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the real `kvqa` CLI in a fresh process group (`kvqa_process`) until it ends."""
    with kvqa_process(*args, env=env) as popen:
        popen.wait(timeout=timeout)
    proc = popen.result
    if check and proc.returncode != 0:
        raise AssertionError(f"kvqa {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def tree_digests(folder: Path) -> dict[str, str]:
    from kvqa.tables import file_digest

    return {str(p.relative_to(folder)): file_digest(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.endswith(".done.json")}


@pytest.fixture(scope="session")
def sample_run(tmp_path_factory) -> Path:
    """One build of the embedded sample through the real CLI and flow; tests compare against it."""
    root = tmp_path_factory.mktemp("sample-build") / "runs"
    proc = run_cli("build", "--output-root", str(root))
    assert "release written" in proc.stderr
    return root / "sample"


@pytest.fixture(scope="session")
def capped_run(tmp_path_factory) -> Path:
    """A build of the sample's Kvasir-VQA part whose dedup caps repeated phrasings (so rows are removed
    by dedup) and that has quarantined rows; no augmented track. Tests may add review files to it."""
    import yaml

    tmp = tmp_path_factory.mktemp("capped-build")
    cfg = write_config(tmp / "c.yaml", SAMPLE_DIR / "metadata.csv", SAMPLE_DIR / "images", run_name="capped",
                       dedup={"max_repeats": 2}, augment={"enabled": False})
    assert yaml.safe_load(cfg.read_text())["dedup"]["max_repeats"] == 2
    run_cli("build", "--config", str(cfg))
    return tmp / "runs" / "capped"


def pytest_collection_modifyitems(session, config, items):
    """The real-LLM tests last (stable order otherwise): their session server (~5 GB, a core) is stopped at
    the session's end, and would sit beside every test that came after them."""
    items.sort(key=lambda item: item.get_closest_marker("real_llm") is not None)


REQUIRE_LLM = bool(os.environ.get("KVQA_REQUIRE_LLM"))  # `make test` sets it: no LLM venv fails, never skips


@pytest.fixture(scope="session")
def real_llm(tmp_path_factory):
    """One real OpenAI-compatible server for the session (`kvqa.llm_server`: vLLM on the CPU, or llama.cpp
    where vLLM cannot run), on a port of its own, with its own state file (a server the user started is
    left alone). Yields a `RealLLM` the tests may kill and restart; stopped, whole process group, after."""
    from kvqa import llm_server

    if not llm_server.installed():
        message = f"no LLM venv at {llm_server.VENV}: `make llm-venv` installs it"
        if REQUIRE_LLM:
            pytest.fail(message)
        pytest.skip(message)
    handle = RealLLM(tmp_path_factory.mktemp("real-llm") / "server.json", _free_port())
    handle.start()
    try:
        yield handle
    finally:
        llm_server.stop(state_path=handle.state_path)


class RealLLM:
    def __init__(self, state_path: Path, port: int):
        self.state_path, self.port = state_path, port
        self.start_s: list[float] = []  # seconds each start took until ready

    def start(self):
        from kvqa import llm_server

        t0 = time.monotonic()
        # No torch.compile: ~60 s less per start (two per session) for a few dozen requests.
        self.state = llm_server.start(self.port, state_path=self.state_path, compile_model=False)
        self.start_s.append(time.monotonic() - t0)
        return self.state

    def kill(self) -> None:
        """SIGKILL to the server's whole process group, as a crash; `start` brings it back."""
        from kvqa import llm_server

        llm_server.kill(state_path=self.state_path)
        llm_server.stop(grace_s=5, state_path=self.state_path)  # reaps it and removes the state file

    @property
    def base_url(self) -> str:
        return self.state.base_url

    @property
    def model(self) -> str:
        return self.state.model
