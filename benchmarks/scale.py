"""Scale-out figures (issue 15): the augmented track on Dask, task runs at 100k images, and the LLM client
over two servers, one killed half way.

- augment: N images (the sample's frames, cycled under distinct ids, so every image draws its own
  parameters) x ten variants, on a Dask `LocalCluster` of 1 and of 2 single-threaded workers (started
  before the clock, as an existing cluster is), and on the local process-pool runner with 2 processes.
  Parallel efficiency = T(1 worker) / (2 x T(2 workers)); runner ratio = T(dask, 2) / T(local, 2).
- task runs for 100,000 images (counted from the chunk sizing, not run), per worker count.
- LLM: two stand-in servers (own processes) answering after 1 s, concurrency 128 each; wall time against
  the ideal n / 256 x 1 s; then a fresh run with one server killed half way: accepted / rejected plans,
  and a re-run that must send only the missing requests. Client CPU per request from the first run.

    .venv/bin/python benchmarks/scale.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import pandas as pd  # noqa: E402
from _common import ROOT, base_csv, print_json, print_table, scale_metadata  # noqa: E402

from augment.catalog import load_artifact_catalog  # noqa: E402
from augment.track import RenderSettings, augment_images, run_in_processes, sized_chunk  # noqa: E402
from generate import compose_plans  # noqa: E402
from generate.llm import ComposeReply, LLMClient, facts_json  # noqa: E402
from generate.llm_cache import RequestCache  # noqa: E402
from generate.openai_backend import OpenAITransport  # noqa: E402
from generate.prompts import load_prompt  # noqa: E402
from generate.realize import plan_inputs  # noqa: E402
from kvqa.catalog import load_catalog  # noqa: E402
from kvqa.config import KvasirVQASource, LLMConfig, PlanConfig, RunnerConfig  # noqa: E402
from sources import read_sources  # noqa: E402

LATENCY_S = 1.0
CONCURRENCY = 128  # per server
CHUNKS_PER_WORKER = 4


def bench_images(n: int) -> pd.DataFrame:
    files = sorted((ROOT / "data/sample/images").glob("*.jpg"))
    paths = [files[i % len(files)] for i in range(n)]
    return pd.DataFrame({"source": "bench", "img_id": [f"{p.stem}-{i:05d}" for i, p in enumerate(paths)],
                         "path": [str(p) for p in paths]})


def time_augment(images: pd.DataFrame, run_dir: Path, chunk_size: int, run_chunks) -> tuple[float, bytes]:
    settings = RenderSettings(load_artifact_catalog(), 42, 95, run_dir)
    t0 = time.perf_counter()
    records, _, _, rendered = augment_images(images, settings, chunk_size=chunk_size, run_chunks=run_chunks)
    assert rendered == len(images) * len(settings.catalog.artifacts)
    return time.perf_counter() - t0, records.drop(columns=[]).to_csv(index=False).encode()


def augment_figures(n: int, tmp: Path) -> dict:
    from distributed import LocalCluster

    from flows.dask_runner import run_on_dask

    images = bench_images(n)
    times, outputs = {}, {}
    for workers in (1, 2):
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as c:
            runner = RunnerConfig(kind="dask", address=c.scheduler_address, n_workers=workers)
            size = sized_chunk(n, workers, CHUNKS_PER_WORKER, 8)
            times[f"dask_{workers}"], outputs[workers] = time_augment(images, tmp / f"dask{workers}", size,
                                                                      run_on_dask(runner))
    times["local_2"], local_out = time_augment(images, tmp / "local", 8, run_in_processes(2))
    same = outputs[1] == outputs[2] == local_out
    return {"images": n, "variants": n * 10, **{f"{k}_s": round(v, 2) for k, v in times.items()},
            "ms_per_variant_1_worker": round(times["dask_1"] / (n * 10) * 1000, 2),
            "parallel_efficiency_2_vs_1": round(times["dask_1"] / (2 * times["dask_2"]), 3),
            "dask_vs_local_ratio": round(times["dask_2"] / times["local_2"], 3), "records_identical": same}


def task_run_counts(n: int = 100_000) -> dict:
    counts = {f"dask_{w}_workers": -(-n // sized_chunk(n, w, CHUNKS_PER_WORKER, 8)) for w in (1, 2, 16, 64, 256)}
    return {"images": n, "local_runner_before": -(-n // 8), **counts}


def start_standin() -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "openai_standin.py"), "--latency",
                             str(LATENCY_S)], stdout=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().strip()


def llm_figures(n: int, tmp: Path) -> dict:
    catalog = load_catalog()
    compose = load_prompt("compose")
    scale_metadata(base_csv(), tmp / "m.csv", max(6_000, n * 2))
    facts = read_sources([KvasirVQASource(metadata_csv=tmp / "m.csv", image_dir=tmp)], catalog).facts
    plans = plan_inputs(compose_plans(facts, PlanConfig(), 42), facts)[:n]
    convs = [compose.render(facts=facts_json(p), k=p.complexity) for p in plans]
    ids = [p.plan_id for p in plans]
    out = {"requests": n, "latency_s": LATENCY_S, "concurrency_per_server": CONCURRENCY,
           "ideal_s": n / (2 * CONCURRENCY) * LATENCY_S}

    def ask(urls: list[str], cache: str, kill: subprocess.Popen | None = None) -> dict:
        cfg = LLMConfig(base_url=urls, concurrency=CONCURRENCY, timeout_s=30, endpoint_cooldown_s=600)
        transport = OpenAITransport(cfg)
        client = LLMClient(transport, RequestCache(tmp / cache), cfg, seed=42)
        timer = threading.Timer(out["ideal_s"] / 2, kill.kill) if kill else None
        if timer:
            timer.start()
        t0, c0 = time.perf_counter(), time.process_time()
        replies = client.ask_structured("compose", ids, convs, compose, ComposeReply)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        return {"wall_s": round(wall, 2), "cpu_ms_per_request": round(cpu / max(client.usage["compose"].requests, 1) * 1000, 3),
                "sent": client.usage["compose"].requests, "cached": client.usage["compose"].cached,
                "accepted": sum(isinstance(r, ComposeReply) for r in replies), "served": dict(transport.served)}

    servers = [start_standin() for _ in range(2)]
    try:
        urls = [u for _, u in servers]
        both = ask(urls, "c1")
        out.update(wall_s=both["wall_s"], ratio_to_ideal=round(both["wall_s"] / out["ideal_s"], 3),
                   client_cpu_ms_per_request=both["cpu_ms_per_request"], accepted=both["accepted"],
                   served_per_server=list(both["served"].values()))
        killed = ask(urls, "c2", kill=servers[0][0])
        rerun = ask(urls, "c2")
        out.update(killed_wall_s=killed["wall_s"], killed_accepted=killed["accepted"],
                   killed_rejected=n - killed["accepted"], killed_served=list(killed["served"].values()),
                   rerun_sent=rerun["sent"], rerun_cached=rerun["cached"], rerun_accepted=rerun["accepted"],
                   rerun_sent_only_missing=rerun["sent"] == n - killed["accepted"])
    finally:
        for proc, _ in servers:
            proc.kill()
            proc.wait()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="48 images and 1,024 requests (else 400 and 5,120)")
    args = ap.parse_args()
    n_images, n_requests = (48, 1024) if args.quick else (400, 5120)
    with tempfile.TemporaryDirectory() as tmp:
        aug = augment_figures(n_images, Path(tmp))
        runs = task_run_counts()
        llm = llm_figures(n_requests, Path(tmp))
    print_table(f"augment on Dask: {aug['images']} images x 10 variants",
                [(k, v) for k, v in aug.items() if k not in ("images",)])
    print_table("task runs for 100,000 images", list(runs.items()))
    print_table(f"LLM: two stand-ins, {LATENCY_S:.0f} s latency, concurrency {CONCURRENCY} each", list(llm.items()))
    print_json({"benchmark": "scale", "quick": args.quick, "augment": aug, "task_runs": runs, "llm": llm})


if __name__ == "__main__":
    main()
