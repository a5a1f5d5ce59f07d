"""Scale-out figures (issue 15): the augmented track on Dask, task runs at 100k images, and the LLM client
over two servers, one killed half way.

- augment: N images (the sample's frames, cycled under distinct ids, so every image draws its own
  parameters) x ten variants, through the flow's own chunk runners: Prefect task runs on a Dask
  `LocalCluster` of 1 and of 2 single-threaded workers, and on the local runner (Prefect tasks handing
  chunks to a pool of 2 processes). Steady state: each runner first renders a few warm-up images, so the
  clock starts with the Prefect server up and the code imported in every worker (an existing cluster after
  its first job; the local fork server after its first pool); the cold start is reported apart.
  Parallel efficiency = T(1 worker) / (2 x T(2 workers)); runner ratio = T(dask, 2) / T(local, 2).
- embed: N distinct question texts (template questions of the real slice, scaled) encoded from an empty
  cache in the dedup stage's blocks of 512: in the flow's process (torch on both cores), and on a Dask
  `LocalCluster` of 1 and of 2 single-threaded workers (`flows.dask_runner.embed_on_dask`), each worker's
  model loaded before the clock starts. Same vectors bit for bit on all three (checked).
- task runs for 100,000 images (counted from the chunking, not run), per worker count.
- LLM: two stand-in servers (own processes) answering after 1 s, concurrency 128 each; wall time against
  the ideal n / 256 x 1 s; then a fresh run with one server killed half way: accepted / rejected plans,
  and a re-run that must send only the missing requests. Client CPU per request from the first run.

    .venv/bin/python benchmarks/scale.py [--quick] [--parts augment,embed,llm]
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
from augment.frames import frame_plan  # noqa: E402
from augment.track import RenderSettings, augment_images, run_in_processes  # noqa: E402
from kvqa.fanout import task_count  # noqa: E402
from dedup import EmbeddingCache, embed_texts, encoder_for  # noqa: E402
from dedup.embed import encode_blocks_on_worker, text_blocks  # noqa: E402
from generate import GroundingChecker, compose_plans, make_backend, realize_plans  # noqa: E402
from generate.llm import ComposeReply, LLMClient, facts_json  # noqa: E402
from generate.llm_cache import RequestCache  # noqa: E402
from generate.openai_backend import OpenAITransport  # noqa: E402
from generate.prompts import load_prompt  # noqa: E402
from generate.realize import plan_inputs  # noqa: E402
from kvqa.catalog import load_catalog  # noqa: E402
from kvqa.config import DedupConfig, GenerateConfig, KvasirVQASource, LLMConfig, PlanConfig, RunnerConfig  # noqa: E402
from kvqa.text import normalise_text  # noqa: E402
from sources import read_sources  # noqa: E402

LATENCY_S = 1.0
CONCURRENCY = 128  # per server
BATCH = 8  # augment.batch_size: images per records batch


def prefect_api_up() -> None:
    """Prefect's temporary server started here, not in a figure, and named in PREFECT_API_URL: the clusters'
    workers report to it, as with a user's server (`flows.dask_runner.dask_task_runner`)."""
    from prefect import flow

    from flows.dask_runner import prefect_api_url

    flow(name="prefect-api-up")(lambda: None)()
    os.environ["PREFECT_API_URL"] = prefect_api_url()


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
    _, _, rendered = augment_images(frame_plan(images), settings, table, batch_size=BATCH, tasks=tasks, run_chunks=run_chunks)
    assert rendered == len(images) * len(settings.catalog.artifacts)
    return time.perf_counter() - t0, table.read_bytes()


def augment_figures(n: int, tmp: Path, cpw: int) -> dict:
    from distributed import Client, LocalCluster
    from prefect import flow

    from flows.steps import map_prefect_tasks
    from flows.dask_runner import environment_kept, local_cluster_kwargs, run_on_dask

    images, warm = bench_images(n), bench_images(4 * BATCH, "warm-")  # 4 task runs: every worker gets one
    times, outputs, cold = {}, {}, {}
    prefect_api_up()
    for workers in (1, 2):
        t0 = time.perf_counter()
        with environment_kept(), LocalCluster(**local_cluster_kwargs(workers)) as c:  # see both helpers
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


def bench_texts(n: int, tmp: Path) -> list[str]:
    """`n` distinct normalised questions of the template backend over the real slice, scaled."""
    catalog = load_catalog()
    scale_metadata(base_csv(), tmp / "embed.csv", 60_000)
    facts = read_sources([KvasirVQASource(metadata_csv=tmp / "embed.csv", image_dir=tmp)], catalog).facts
    qa, _ = realize_plans(compose_plans(facts, PlanConfig(), 42), facts, make_backend(GenerateConfig(), catalog, 42),
                          GroundingChecker(catalog))
    distinct = sorted(set(normalise_text(q, punctuation=False) for q in qa["question"]))
    assert len(distinct) >= n, f"only {len(distinct)} distinct questions"
    return distinct[:: len(distinct) // n][:n]  # spread over the sorted texts, not their first letters


def embed_figures(n: int, tmp: Path, cpw: int) -> dict:
    import numpy as np
    from distributed import Client, LocalCluster

    from flows.dask_runner import embed_on_dask, environment_kept, local_cluster_kwargs

    texts, config = bench_texts(n, tmp), DedupConfig()
    times, vectors = {}, {}
    prefect_api_up()

    def timed(label: str, run_blocks=None) -> None:
        encoder = encoder_for(config)
        if run_blocks is None:
            encoder.encode(["warm up"])  # the model loaded before the clock starts, as in the workers
        t0 = time.perf_counter()
        vectors[label] = embed_texts(texts, encoder, EmbeddingCache(tmp / f"embed-{label}", encoder.vectors_id),
                                     run_blocks)
        times[label] = time.perf_counter() - t0
        print(f"embed: {label} {times[label]:.1f} s", file=sys.stderr)

    timed("local")
    cold = {}
    for workers in (1, 2):
        t0 = time.perf_counter()
        with environment_kept(), LocalCluster(**local_cluster_kwargs(workers)) as c:  # see both helpers
            with Client(c) as client:  # every worker loads its model (process_encoder) before the clock starts
                client.run(__import__, "flows.dask_runner")
                client.run(encode_blocks_on_worker, [["warm up"]], config, None, encoder_for(config).vectors_id)
            runner = RunnerConfig(kind="dask", address=c.scheduler_address, n_workers=workers, chunks_per_worker=cpw)
            run = embed_on_dask(runner, config, tmp / f"embed-dask_{workers}", encoder_for(config).vectors_id)
            run([[f"warm up {i}"] for i in range(4)])  # each worker's first Prefect task run, off the clock
            cold[f"dask_{workers}_start_s"] = round(time.perf_counter() - t0, 2)
            timed(f"dask_{workers}", run)
    return {"texts": n, "blocks": len(text_blocks(texts)), **{f"{k}_s": round(v, 2) for k, v in times.items()},
            "texts_per_s_1_worker": round(n / times["dask_1"], 1),
            "parallel_efficiency_2_vs_1": round(times["dask_1"] / (2 * times["dask_2"]), 3),
            "dask_2_vs_local_ratio": round(times["dask_2"] / times["local"], 3),
            "vectors_identical": all(np.array_equal(vectors["local"], v) for v in vectors.values()), **cold}


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
    ap.add_argument("--quick", action="store_true",
                    help="64 images, 1,024 texts and 1,024 requests (else 400, 3,072 and 5,120)")
    ap.add_argument("--chunks-per-worker", type=int, default=RunnerConfig().chunks_per_worker,
                    help="task runs per worker (default: the config's)")
    ap.add_argument("--parts", default="augment,embed,llm", help="which figures, comma-separated")
    args = ap.parse_args()
    cpw, parts = args.chunks_per_worker, set(args.parts.split(","))
    n_images, n_texts, n_requests = (64, 1024, 1024) if args.quick else (400, 3072, 5120)
    with tempfile.TemporaryDirectory() as tmp:
        aug = augment_figures(n_images, Path(tmp), cpw) if "augment" in parts else {}
        emb = embed_figures(n_texts, Path(tmp), cpw) if "embed" in parts else {}
        runs = task_run_counts(cpw)
        llm = llm_figures(n_requests, Path(tmp)) if "llm" in parts else {}
    if aug:
        print_table(f"augment on Dask: {aug['images']} images x 10 variants",
                    [(k, v) for k, v in aug.items() if k not in ("images",)])
    if emb:
        print_table(f"embedding on Dask: {emb['texts']} texts from an empty cache",
                    [(k, v) for k, v in emb.items() if k not in ("texts",)])
    print_table("task runs for 100,000 images", list(runs.items()))
    if llm:
        print_table(f"LLM: two stand-ins, {LATENCY_S:.0f} s latency, concurrency {CONCURRENCY} each", list(llm.items()))
    print_json({"benchmark": "scale", "quick": args.quick, "chunks_per_worker": cpw, "augment": aug, "embed": emb,
                "task_runs": runs, "llm": llm})


if __name__ == "__main__":
    main()
