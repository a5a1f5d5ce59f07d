"""LLM client throughput against the loopback OpenAI-compatible stand-in with a fixed latency.

5,000 distinct compose requests (plans of the real Kvasir-VQA slice, scaled), a stand-in answering each
after 100 ms, concurrency 64. The ideal wall time is 5,000 / 64 x 0.1 s = 7.8 s; goal: within 1.15x of it.
The stand-in runs in its own process so its CPU is not the client's. Then the same run again from the
request cache: it must make zero requests. Reported: wall time, ratio to ideal, client CPU per request.

    .venv/bin/python benchmarks/llm_client.py [--quick]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, base_csv, print_json, print_table, scale_metadata

from generate import compose_plans
from generate.llm import ComposeReply, LLMClient, facts_json
from generate.llm_cache import RequestCache
from generate.openai_backend import OpenAITransport
from generate.prompts import load_prompt
from generate.realize import plan_inputs
from kvqa.catalog import load_catalog
from kvqa.config import KvasirVQASource, LLMConfig, PlanConfig
from sources import read_sources

LATENCY_S = 0.1
CONCURRENCY = 64


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="1,000 requests instead of 5,000")
    args = ap.parse_args()
    n = 1_000 if args.quick else 5_000
    catalog = load_catalog()
    compose = load_prompt("compose")
    server = subprocess.Popen([sys.executable, str(ROOT / "tests" / "openai_standin.py"), "--latency",
                               str(LATENCY_S)], stdout=subprocess.PIPE, text=True)
    try:
        url = server.stdout.readline().strip()
        with tempfile.TemporaryDirectory() as tmp:
            scale_metadata(base_csv(), Path(tmp) / "m.csv", 6_000)
            facts = read_sources([KvasirVQASource(metadata_csv=Path(tmp) / "m.csv", image_dir=tmp)], catalog).facts
            plans = plan_inputs(compose_plans(facts, PlanConfig(), 42), facts)[:n]
            convs = [compose.render(facts=facts_json(p), k=p.complexity) for p in plans]
            ids = [p.plan_id for p in plans]
            cfg = LLMConfig(base_url=url, concurrency=CONCURRENCY, timeout_s=30)
            runs = {}
            for label in ("cold", "cached"):
                transport = OpenAITransport(cfg)
                client = LLMClient(transport, RequestCache(Path(tmp) / "cache"), cfg, seed=42)
                t0, c0 = time.perf_counter(), time.process_time()
                replies = client.ask_structured("compose", ids, convs, compose, ComposeReply)
                runs[label] = {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
                               "requests": client.usage["compose"].requests,
                               "cached": client.usage["compose"].cached, "retries": transport.retries,
                               "valid": sum(isinstance(r, ComposeReply) for r in replies)}
    finally:
        server.terminate()
        server.wait()
    ideal = n / CONCURRENCY * LATENCY_S
    cold, cached = runs["cold"], runs["cached"]
    ratio = cold["wall_s"] / ideal
    print_table(f"LLM client: {n:,} requests, {LATENCY_S * 1000:.0f} ms latency, concurrency {CONCURRENCY}",
                [("ideal wall s (n / concurrency x latency)", round(ideal, 2)),
                 ("cold wall s", round(cold["wall_s"], 2)), ("ratio to ideal (goal <= 1.15)", round(ratio, 3)),
                 ("client CPU ms / request", round(cold["cpu_s"] / n * 1000, 2)),
                 ("valid replies", cold["valid"]), ("retries", cold["retries"]),
                 ("cached re-run: requests sent", cached["requests"]),
                 ("cached re-run: wall s", round(cached["wall_s"], 2))])
    print_json({"benchmark": "llm_client", "requests": n, "latency_s": LATENCY_S, "concurrency": CONCURRENCY,
                "ideal_s": round(ideal, 3), "wall_s": round(cold["wall_s"], 3), "ratio_to_ideal": round(ratio, 3),
                "within_goal": ratio <= 1.15, "client_cpu_ms_per_request": round(cold["cpu_s"] / n * 1000, 3),
                "rerun_requests": cached["requests"], "rerun_cached": cached["cached"],
                "rerun_wall_s": round(cached["wall_s"], 3)})


if __name__ == "__main__":
    main()
