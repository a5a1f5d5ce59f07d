"""LLM requests across several OpenAI-compatible servers (`generate.llm.base_url` as a list), through the
real `openai` client against loopback stand-ins, one of which dies half way."""

from __future__ import annotations

import asyncio
import time

import pytest

from generate.openai_backend import Endpoint, EndpointPool, resolved_base_urls
from kvqa.config import LLMConfig
from openai_standin import OpenAIStandIn
from test_llm import llm_config, run, small  # noqa: F401 (a module fixture)


def test_requests_spread_over_both_servers_and_rerun_is_free(small, catalog, tmp_path):
    plans = small[1]
    with OpenAIStandIn(latency_s=0.01) as a, OpenAIStandIn(latency_s=0.01) as b:
        qa, rejected, backend = run(llm_config([a.url, b.url], tmp_path / "cache"), small, catalog)
        assert rejected.empty and len(qa) == len(plans) == a.requests + b.requests
        # Least outstanding requests over two equal servers: each gets about half.
        assert min(a.requests, b.requests) >= len(plans) // 3
        sent = a.requests + b.requests
        run(llm_config([b.url], tmp_path / "cache"), small, catalog)  # one replica alone: all cached
        assert a.requests + b.requests == sent


def test_a_server_dying_half_way_sends_its_requests_to_the_other(small, catalog, tmp_path):
    plans = small[1]
    n = len(plans)
    with OpenAIStandIn(latency_s=0.02, kill_after=n // 4) as a, OpenAIStandIn(latency_s=0.02) as b:
        cfg = llm_config([a.url, b.url], tmp_path / "cache", endpoint_cooldown_s=60)
        t0 = time.monotonic()
        qa, rejected, backend = run(cfg, small, catalog)
        took = time.monotonic() - t0
    assert a.dead and a.requests == n // 4
    assert rejected.empty and len(qa) == n      # every plan accepted: the survivor answered the rest
    # ... including the requests in flight on `a` when it died (at least the one that killed it).
    assert n - a.requests < b.requests < n
    transport = backend.client.transport
    assert transport.set_aside[resolved_base_urls(cfg.llm)[0].rstrip("/")] == 1
    assert took < 30  # no backoff waits behind a dead server


def test_no_retries_left_rejects_then_rerun_sends_only_the_missing(small, catalog, tmp_path):
    """Without retries the requests in flight on the dying server fail: their plans are rejected
    (`request_failed`), the others accepted; the re-run (with retries, the dead server still listed)
    sends exactly the failed ones."""
    plans = small[1]
    n = len(plans)
    with OpenAIStandIn(latency_s=0.05, kill_after=n // 4) as a, OpenAIStandIn(latency_s=0.05) as b:
        cfg = llm_config([a.url, b.url], tmp_path / "cache", max_retries=0, endpoint_cooldown_s=60)
        qa, rejected, _ = run(cfg, small, catalog)
        assert len(qa) + len(rejected) == n
        assert len(rejected) > 0 and set(rejected.reason) == {"request_failed"}
        before = b.requests
        t0 = time.monotonic()
        qa2, rejected2, backend2 = run(llm_config([a.url, b.url], tmp_path / "cache", endpoint_cooldown_s=60),
                                       small, catalog)  # `a` is still dead
        assert time.monotonic() - t0 < 10
    assert rejected2.empty and len(qa2) == n
    assert b.requests - before == len(rejected) == backend2.usage["compose"]["requests"]
    assert backend2.usage["compose"]["last_execution"]["cached"] == n - len(rejected)


def test_last_endpoint_up_is_never_set_aside_and_cooldown_ends():
    async def scenario():
        pool = EndpointPool([Endpoint(f"http://e{i}/v1", [], asyncio.Queue(), 1, i) for i in range(2)],
                            failures_to_set_aside=2, cooldown_s=0.2)
        for e in pool.endpoints:
            e.slots.put_nowait(object())
        e0, e1 = pool.endpoints
        assert not pool.failed(e0, refused=False)  # one 5xx: not yet
        assert pool.failed(e0, refused=False)      # two in a row: set aside
        assert not pool.failed(e1, refused=True)   # the last one up stays
        got, _ = await pool.acquire()
        assert got is e1
        t0 = time.monotonic()
        waited, _ = await pool.acquire()           # e1 is full, e0 cooling down: waits for e0
        assert waited is e0 and time.monotonic() - t0 >= 0.15

    asyncio.run(scenario())


def test_base_url_list_validated_and_deduplicated():
    with pytest.raises(ValueError, match="empty list"):
        LLMConfig(base_url=[])
    cfg = LLMConfig(base_url=["http://a:8000/v1", "http://A:8000/v1/", "http://b:8000/v1"])
    assert resolved_base_urls(cfg) == ["http://a:8000/v1", "http://b:8000/v1"]
