"""The `openai` transport against a real LLM server on this CPU (kvqa llm-server: SmolLM2-135M-Instruct).

Compose requests of the embedded sample's plans, the same bodies for every run. For concurrency 1 / 4 / 8
/ 16: requests/s, output tokens/s, the client's CPU per request against the server's time per request
(wall x concurrency / requests: how long a request is in flight). At each concurrency the same bodies also
go through a bare `openai` client loop (`chat.completions.create`, an `asyncio.Semaphore`) in the same run;
kvqa's wall time over the bare loop's is the client's overhead: goal <= 1.1x. A first untimed pass fills the
server's prefix cache so that neither side gets it alone; each side runs twice, in the order kvqa, bare,
bare, kvqa, and its faster run counts (the machine is shared: one slow run is another process, not the
client).

    .venv/bin/python benchmarks/llm_real.py [--quick] [--base-url URL] [--no-compile]

Without --base-url the benchmark starts its own server (`kvqa.llm_server.start`) and stops it after.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import tempfile
import time
from pathlib import Path

import openai
from _common import print_json, print_table

from generate import compose_plans
from generate.llm import LLMClient, chat_body, facts_json
from generate.llm_cache import RequestCache
from generate.openai_backend import OpenAITransport
from generate.prompts import load_prompt
from generate.realize import plan_inputs
from kvqa import llm_server
from kvqa.catalog import load_catalog
from kvqa.config import LLMConfig, load_config
from sources import read_sources

CONCURRENCY = (1, 4, 8, 16)
GOAL = 1.1


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def compose_requests(n: int) -> tuple[list[str], list[list[dict]]]:
    cfg = load_config(None)
    catalog = load_catalog(cfg.catalog)
    facts = read_sources(cfg.sources, catalog).facts
    plans = plan_inputs(compose_plans(facts, cfg.plans, cfg.seed), facts)
    step = max(1, len(plans) // n)  # spread over the levels and images, not the first image's plans
    plans = plans[::step][:n]
    compose = load_prompt("compose")
    return [p.plan_id for p in plans], [compose.render(facts=facts_json(p), k=p.complexity) for p in plans]


def kvqa_run(cfg: LLMConfig, ids, convs) -> dict:
    """The transport as the pipeline uses it: LLMClient.ask over an empty cache (so every body is sent)."""
    compose = load_prompt("compose")
    with tempfile.TemporaryDirectory() as tmp:
        client = LLMClient(OpenAITransport(cfg), RequestCache(Path(tmp)), cfg, seed=42)
        t0, c0 = time.perf_counter(), time.process_time()
        replies = client.ask("compose", ids, convs, compose)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert client.usage["compose"].requests == len(ids) and not any(r.error for r in replies)
    return {"wall_s": wall, "cpu_s": cpu, "output_tokens": sum(r.completion_tokens for r in replies)}


def bodies_of(cfg: LLMConfig, ids, convs) -> list[dict]:
    """The exact bodies kvqa sends (same seeds, schema, max_tokens): what the bare loop sends too."""
    compose = load_prompt("compose")
    client = LLMClient(OpenAITransport(cfg), RequestCache(Path(tempfile.mkdtemp())), cfg, seed=42)
    return [chat_body(cfg.model, m, client.params("compose", i), compose.name, compose.schema_, cfg.extra_body)
            for i, m in zip(ids, convs)]


def bare_run(base_url: str, bodies: list[dict], concurrency: int) -> dict:
    async def go():
        client = openai.AsyncOpenAI(base_url=base_url, api_key="EMPTY", max_retries=0, timeout=120)
        gate = asyncio.Semaphore(concurrency)

        async def one(body):
            async with gate:
                return await client.chat.completions.create(**body)

        try:
            return await asyncio.gather(*(one(b) for b in bodies))
        finally:
            await client.close()

    t0, c0 = time.perf_counter(), time.process_time()
    out = asyncio.run(go())
    return {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
            "output_tokens": sum(r.usage.completion_tokens for r in out)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="16 requests per run instead of 48")
    ap.add_argument("--base-url", help="a running kvqa llm-server (default: start one)")
    ap.add_argument("--no-compile", action="store_true", help="start vLLM without torch.compile (as the tests)")
    args = ap.parse_args()
    n = 16 if args.quick else 48
    state_path = Path(tempfile.mkdtemp()) / "server.json"
    started = None
    if args.base_url:
        base_url, engine = args.base_url, "given"
    else:
        t0 = time.perf_counter()
        state = llm_server.start(free_port(), state_path=state_path, compile_model=not args.no_compile)
        started, base_url, engine = time.perf_counter() - t0, state.base_url, state.engine
        if state.engine == "vllm" and args.no_compile:
            engine = "vllm --enforce-eager"
    try:
        ids, convs = compose_requests(n)
        results = {}
        warm_cfg = LLMConfig(base_url=base_url, model=llm_server.MODEL_NAME, concurrency=16, timeout_s=120,
                             max_retries=0)
        bare_run(base_url, bodies_of(warm_cfg, ids, convs), 16)  # the server's prefix cache, for both
        for c in CONCURRENCY:
            cfg = warm_cfg.model_copy(update={"concurrency": c})
            bodies = bodies_of(cfg, ids, convs)
            for side in ("kvqa", "bare", "bare", "kvqa"):
                run = kvqa_run(cfg, ids, convs) if side == "kvqa" else bare_run(base_url, bodies, c)
                if (c, side) not in results or run["wall_s"] < results[(c, side)]["wall_s"]:
                    results[(c, side)] = run
    finally:
        if started is not None:
            llm_server.stop(state_path=state_path)
    rows, figures = [], {}
    for c in CONCURRENCY:
        kv, bare = results[(c, "kvqa")], results[(c, "bare")]
        ratio = kv["wall_s"] / bare["wall_s"]
        server_ms = kv["wall_s"] * c / n * 1000
        figures[str(c)] = {"requests_per_s": round(n / kv["wall_s"], 3),
                           "output_tokens_per_s": round(kv["output_tokens"] / kv["wall_s"], 1),
                           "client_cpu_ms_per_request": round(kv["cpu_s"] / n * 1000, 2),
                           "bare_client_cpu_ms_per_request": round(bare["cpu_s"] / n * 1000, 2),
                           "server_ms_per_request": round(server_ms, 1), "kvqa_wall_s": round(kv["wall_s"], 2),
                           "bare_wall_s": round(bare["wall_s"], 2), "kvqa_output_tokens": kv["output_tokens"],
                           "bare_output_tokens": bare["output_tokens"], "kvqa_over_bare": round(ratio, 3)}
        rows.append((f"concurrency {c:>2}: req/s | out tok/s", f"{n / kv['wall_s']:.2f} | "
                     f"{kv['output_tokens'] / kv['wall_s']:.0f}"))
        rows.append((f"concurrency {c:>2}: client CPU ms/req (bare) | server ms/req",
                     f"{kv['cpu_s'] / n * 1000:.1f} ({bare['cpu_s'] / n * 1000:.1f}) | {server_ms:.0f}"))
        rows.append((f"concurrency {c:>2}: kvqa / bare wall (goal <= {GOAL})",
                     f"{kv['wall_s']:.1f} / {bare['wall_s']:.1f} s = {ratio:.3f}"))
    worst = max(f["kvqa_over_bare"] for f in figures.values())
    print_table(f"real LLM ({engine}, {llm_server.MODEL_NAME}), {n} compose requests per run, CPU {cpu_name()}",
                rows + [("server start s", round(started, 1) if started else "n/a"),
                        ("worst kvqa / bare", worst)])
    print_json({"benchmark": "llm_real", "cpu": cpu_name(), "engine": engine, "model": llm_server.MODEL_NAME,
                "requests_per_run": n, "server_start_s": round(started, 1) if started else None,
                "by_concurrency": figures, "worst_kvqa_over_bare": worst, "within_goal": worst <= GOAL})


if __name__ == "__main__":
    main()
