"""Scale-out figures (issue 15): the augmented track on Dask, task runs at 100k images, and the LLM client
over two servers, one killed half way.

- augment: N images (the sample's frames, cycled under distinct ids, so every image draws its own
  parameters) x ten variants, through the flow's own chunk runners: Prefect task runs on a Dask
  `LocalCluster` of 1 and of 2 single-threaded workers, and on the local runner (Prefect tasks handing
  chunks to a pool of 2 processes). Steady state: each runner first renders a few warm-up images, so the
  clock starts with the Prefect server up and the code imported in every worker (an existing cluster after
  its first job; the local fork server after its first pool); the cold start is reported apart.
  Parallel efficiency = T(1 worker) / (2 x T(2 workers)); runner ratio = T(dask, 2) / T(local, 2).
- task runs for 100,000 images (counted from the chunking, not run), per worker count.
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
from augment.track import RenderSettings, augment_images, run_in_processes  # noqa: E402
from kvqa.fanout import task_count  # noqa: E402
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
BATCH = 8  # augment.chunk_size: images per records batch


def bench_images(n: int, prefix: str = "") -> pd.DataFrame:
    files = sorted((ROOT / "data/sample/images").glob("*.jpg"))
    paths = [files[i % len(files)] for i in range(n)]
    return pd.DataFrame({"source": "bench", "img_id": [f"{prefix}{p.stem}-{i:05d}" for i, p in enumerate(paths)],
                         "path": [str(p) for p in paths]})


def time_augment(images: pd.DataFrame, run_dir: Path, workers: int, cpw: int, run_chunks) -> tuple[float, bytes]:
    settings = RenderSettings(load_artifact_catalog(), 42, 95, run_dir)
    tasks = task_count(-(-len(images) // BATCH), workers, cpw)
    t0 = time.perf_counter()
    table = run_dir / "stages" / "augmentations.parquet"
    _, _, rendered = augment_images(images, settings, table, chunk_size=BATCH, tasks=tasks, run_chunks=run_chunks)
    assert rendered == len(images) * len(settings.catalog.artifacts)
    return time.perf_counter() - t0, table.read_bytes()


def augment_figures(n: int, tmp: Path, cpw: int) -> dict:
    from distributed import Client, LocalCluster
    from prefect import flow

    from flows.augment_track import map_prefect_tasks
    from flows.dask_runner import run_on_dask

    images, warm = bench_images(n), bench_images(4 * BATCH, "warm-")  # 4 task runs: every worker gets one
    times, outputs, cold = {}, {}, {}
    flow(name="prefect-api-up")(lambda: None)()  # Prefect's temporary server starts here, not in a figure
    for workers in (1, 2):
        t0 = time.perf_counter()
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as c:
            with Client(c) as client:
                client.run(__import__, "flows.dask_runner")  # the code every task needs, in every worker
            run = run_on_dask(RunnerConfig(kind="dask", address=c.scheduler_address, n_workers=workers))
            time_augment(warm, tmp / f"warm-dask{workers}", workers, cpw, run)
            cold[f"dask_{workers}_start_s"] = round(time.perf_counter() - t0, 2)
            times[f"dask_{workers}"], outputs[workers] = time_augment(images, tmp / f"dask{workers}", workers, cpw, run)
            print(f"augment: {times}", file=sys.stderr)
    # The local runner maps its Prefect tasks inside the flow (as the augment stage does in a build).
    local = run_in_processes(2, map_prefect_tasks)
    t0 = time.perf_counter()
    flow(name="augment-local")(lambda: time_augment(warm, tmp / "warm-local", 2, cpw, local))()
    cold["local_2_start_s"] = round(time.perf_counter() - t0, 2)
    times["local_2"], local_out = flow(name="augment-local")(lambda: time_augment(images, tmp / "local", 2, cpw, local))()
    print(f"augment: {times}", file=sys.stderr)
    return {"images": n, "variants": n * 10, **{f"{k}_s": round(v, 2) for k, v in times.items()},
            "ms_per_variant_1_worker": round(times["dask_1"] / (n * 10) * 1000, 2),
            "parallel_efficiency_2_vs_1": round(times["dask_1"] / (2 * times["dask_2"]), 3),
            "dask_vs_local_ratio": round(times["dask_2"] / times["local_2"], 3),
            "records_identical": outputs[1] == outputs[2] == local_out, **cold}


def task_run_counts(cpw: int, n: int = 100_000) -> dict:
    batches = -(-n // BATCH)
    counts = {f"{w}_workers": task_count(batches, w, cpw) for w in (1, 2, 16, 64, 256)}
    return {"images": n, "records_batches": batches, "before_one_task_per_batch": batches, **counts}


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
    ap.add_argument("--quick", action="store_true", help="64 images and 1,024 requests (else 400 and 5,120)")
    ap.add_argument("--chunks-per-worker", type=int, default=RunnerConfig().chunks_per_worker,
                    help="task runs per worker (default: the config's)")
    ap.add_argument("--augment-only", action="store_true", help="skip the LLM figures")
    args = ap.parse_args()
    cpw = args.chunks_per_worker
    n_images, n_requests = (64, 1024) if args.quick else (400, 5120)
    with tempfile.TemporaryDirectory() as tmp:
        aug = augment_figures(n_images, Path(tmp), cpw)
        runs = task_run_counts(cpw)
        llm = {} if args.augment_only else llm_figures(n_requests, Path(tmp))
    print_table(f"augment on Dask: {aug['images']} images x 10 variants",
                [(k, v) for k, v in aug.items() if k not in ("images",)])
    print_table("task runs for 100,000 images", list(runs.items()))
    if llm:
        print_table(f"LLM: two stand-ins, {LATENCY_S:.0f} s latency, concurrency {CONCURRENCY} each", list(llm.items()))
    print_json({"benchmark": "scale", "quick": args.quick, "chunks_per_worker": cpw, "augment": aug,
                "task_runs": runs, "llm": llm})


if __name__ == "__main__":
    main()
