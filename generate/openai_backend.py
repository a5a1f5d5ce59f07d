"""`openai` transport: any OpenAI-compatible chat server (OpenAI, `vllm serve`, SGLang, Ollama, llama.cpp)
through the official async `openai` client.

`base_url` may list several servers of the same model: each request goes to the endpoint with the fewest
requests in flight (least outstanding requests), and an endpoint that refuses connections or answers 5xx
`endpoint_failures` times in a row is set aside for `endpoint_cooldown_s`, its failed requests retried at
once on the others. Concurrency is bounded per endpoint by a pool of slots, a semaphore in effect (a slow
request never holds back a whole slice); each slot belongs to one of several clients of at most `CONNECTIONS_PER_CLIENT` connections,
because httpx scans every connection of its pool on each request and one pool of 64 cost ~1 ms of CPU per
request here. Each request has a timeout; 408/409/429/5xx replies, timeouts and connection errors are retried with exponential backoff and
full jitter, honouring `Retry-After` / `retry-after-ms`. The client's own retries are off so that every
retry is ours, counted and bounded. Other errors fail the request (and so reject its plan) at once.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import os
import random
import time
from dataclasses import dataclass
from typing import Sequence

import httpx2
import openai
from tqdm.auto import tqdm

from generate.llm import ChatReply, ChatRequest, OnReply
from generate.llm_cache import OPENAI_DEFAULT_BASE_URL, endpoint_id
from kvqa.config import LLMConfig

RETRYABLE = {408, 409, 429}
CONNECTIONS_PER_CLIENT = 8

log = logging.getLogger(__name__)


def resolved_base_urls(config: LLMConfig) -> list[str]:
    """The servers the requests go to: `base_url` (one or a list), else `OPENAI_BASE_URL` (which the openai
    client would read on its own), else OpenAI. The same server spelt twice counts once."""
    urls = config.base_url if isinstance(config.base_url, list) else [
        config.base_url or os.environ.get("OPENAI_BASE_URL") or OPENAI_DEFAULT_BASE_URL]
    unique: dict[str, str] = {}
    for url in urls:
        unique.setdefault(endpoint_id(url), url)
    return list(unique.values())


def reply_from_completion(body: dict) -> ChatReply:
    """A chat-completions response body (dict) -> ChatReply."""
    choice = (body.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    usage = body.get("usage") or {}
    return ChatReply(content=message.get("content"), refusal=message.get("refusal"),
                     finish_reason=choice.get("finish_reason"),
                     prompt_tokens=int(usage.get("prompt_tokens") or 0),
                     completion_tokens=int(usage.get("completion_tokens") or 0))


def retry_after_s(headers) -> float | None:
    if headers is None:
        return None
    if (ms := headers.get("retry-after-ms")) is not None:
        try:
            return float(ms) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value)
        return max(0.0, parsed.timestamp() - time.time()) if parsed else None


class EndpointDown(Exception):
    """A request failed on an endpoint that has just been set aside: retried on another at once."""


@dataclass
class Endpoint:
    """One server of the list: its clients (each a slot of the request semaphore), the requests now in
    flight there, and its health."""

    url: str
    clients: list
    slots: asyncio.Queue
    capacity: int
    index: int
    outstanding: int = 0
    failures: int = 0  # failed requests in a row (connection refused, 5xx); a success resets it
    down_until: float = 0.0  # monotonic time until which it is set aside
    served: int = 0
    set_aside: int = 0


class EndpointPool:
    """Least-outstanding-requests routing over the endpoints, with set-aside endpoints skipped.

    All in one event loop, so plain counters need no lock. A request waits for a slot when every endpoint
    is full or set aside; a released slot wakes one waiter, and waiters wake on their own when a set-aside
    endpoint's cool-down ends.
    """

    def __init__(self, endpoints: list[Endpoint], failures_to_set_aside: int, cooldown_s: float):
        self.endpoints = endpoints
        self.failures_to_set_aside = failures_to_set_aside
        self.cooldown_s = cooldown_s
        self.changed = asyncio.Condition()

    def up(self, now: float) -> list[Endpoint]:
        return [e for e in self.endpoints if e.down_until <= now]

    async def acquire(self) -> tuple[Endpoint, openai.AsyncOpenAI]:
        async with self.changed:
            while True:
                now = time.monotonic()
                free = [e for e in self.up(now) if e.outstanding < e.capacity]
                if free:
                    best = min(free, key=lambda e: (e.outstanding, e.index))
                    best.outstanding += 1
                    return best, best.slots.get_nowait()
                down = [e.down_until for e in self.endpoints if e.down_until > now]
                try:
                    await asyncio.wait_for(self.changed.wait(), timeout=min(down) - now if down else None)
                except TimeoutError:
                    pass

    async def release(self, endpoint: Endpoint, client: openai.AsyncOpenAI) -> None:
        endpoint.outstanding -= 1
        endpoint.slots.put_nowait(client)
        async with self.changed:
            self.changed.notify(1)

    def succeeded(self, endpoint: Endpoint) -> None:
        endpoint.failures = 0
        endpoint.served += 1

    def failed(self, endpoint: Endpoint, refused: bool) -> bool:
        """Count a failure; set the endpoint aside when it refused the connection or failed too often in a
        row, unless it is the last one up (then the backoff retries wait for it). True when set aside."""
        endpoint.failures += 1
        now = time.monotonic()
        if endpoint.down_until > now:
            return True  # already set aside by a request that failed before this one
        if not (refused or endpoint.failures >= self.failures_to_set_aside):
            return False
        if not any(e is not endpoint for e in self.up(now)) or not self.cooldown_s:
            return False
        endpoint.down_until = now + self.cooldown_s
        endpoint.set_aside += 1
        endpoint.failures = 0
        log.warning("LLM endpoint %s set aside for %.0f s; its requests go to the others",
                    endpoint_id(endpoint.url), self.cooldown_s)
        return True


class OpenAITransport:
    name = "openai"
    # With no reply for this long, say what the client is waiting for (a dead server's open connections
    # are held until `timeout_s`; the progress bar alone only shows its ETA growing).
    stall_log_s = 15.0

    body_defaults: dict = {}
    # The cache key does not name the server: the model and the body decide a reply, so every endpoint of
    # the list (and a server moved to another address) serves the same cache (docs/design.md, LLM generation).
    endpoint = "openai-compatible"

    def __init__(self, config: LLMConfig):
        self.config = config
        self.base_urls = resolved_base_urls(config)
        self.retries = 0
        self.served: dict[str, int] = {}  # replies per endpoint (without credentials), of the last run
        self.set_aside: dict[str, int] = {}
        # One TLS context for every client: httpx builds (and loads the CA bundle into) one per client
        # otherwise, ~55 ms each, 1.7 s for two endpoints at concurrency 128 before the first request.
        self.ssl_context = httpx2.create_ssl_context()

    def complete(self, requests: Sequence[ChatRequest], stage: str, on_reply: OnReply) -> list[ChatReply]:
        return asyncio.run(self._complete(requests, stage, on_reply))

    def _endpoint(self, url: str, index: int) -> Endpoint:
        cfg = self.config
        n_clients = -(-cfg.concurrency // CONNECTIONS_PER_CLIENT)
        limits = httpx2.Limits(max_connections=CONNECTIONS_PER_CLIENT, max_keepalive_connections=CONNECTIONS_PER_CLIENT)
        # A local server needs no key; the client still wants a non-empty string.
        clients = [openai.AsyncOpenAI(base_url=url, api_key=os.environ.get(cfg.api_key_env) or "EMPTY",
                                      max_retries=0, timeout=cfg.timeout_s,
                                      http_client=openai.DefaultAsyncHttpxClient(limits=limits,
                                                                                 verify=self.ssl_context))
                   for _ in range(n_clients)]
        slots: asyncio.Queue = asyncio.Queue()
        for i in range(cfg.concurrency):
            slots.put_nowait(clients[i % n_clients])
        return Endpoint(url, clients, slots, cfg.concurrency, index)

    async def _complete(self, requests: Sequence[ChatRequest], stage: str, on_reply: OnReply) -> list[ChatReply]:
        cfg = self.config
        pool = EndpointPool([self._endpoint(u, i) for i, u in enumerate(self.base_urls)],
                            cfg.endpoint_failures, cfg.endpoint_cooldown_s)
        tokens, start = 0, time.perf_counter()
        self._last_reply, self._backing_off = time.monotonic(), 0
        watchdog = asyncio.create_task(self._log_stalls(pool, stage))
        bar = tqdm(total=len(requests), desc=f"{stage} ({cfg.model})", unit="req", mininterval=1.0,
                   disable=len(requests) < 200)

        async def one(req: ChatRequest) -> ChatReply:
            nonlocal tokens
            reply = await self._with_retries(pool, req.body)
            self._last_reply = time.monotonic()
            on_reply(req, reply)
            tokens += reply.completion_tokens
            bar.update(1)
            bar.set_postfix_str(f"{tokens / max(time.perf_counter() - start, 1e-9):.0f} tok/s", refresh=False)
            return reply

        try:
            return list(await asyncio.gather(*(one(r) for r in requests)))
        finally:
            watchdog.cancel()
            bar.close()
            for e in pool.endpoints:
                name = endpoint_id(e.url)
                self.served[name] = e.served
                self.set_aside[name] = e.set_aside
                for client in e.clients:
                    await client.close()

    async def _log_stalls(self, pool: EndpointPool, stage: str) -> None:
        """Every `stall_log_s` without a reply: a warning naming the requests in flight per endpoint, how long
        each may still take, and those waiting to be retried."""
        cfg = self.config
        while True:
            await asyncio.sleep(self.stall_log_s)
            quiet = time.monotonic() - self._last_reply
            if quiet < self.stall_log_s:
                continue
            flying = ", ".join(f"{e.outstanding} on {endpoint_id(e.url)}" for e in pool.endpoints if e.outstanding)
            log.warning("%s: no reply for %.0f s; waiting for %s request(s) in flight (%s), each until it "
                        "answers or times out (timeout_s %.0f s, then up to %d retries)%s", stage, quiet,
                        sum(e.outstanding for e in pool.endpoints), flying or "none", cfg.timeout_s,
                        cfg.max_retries, f", and {self._backing_off} waiting to be retried" if self._backing_off
                        else "")

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.config.backoff_max_s)
        cap = min(self.config.backoff_max_s, self.config.backoff_base_s * 2 ** attempt)
        return random.uniform(0, cap)  # full jitter: timing only, never the data

    async def _send(self, pool: EndpointPool, body: dict) -> ChatReply:
        """One attempt on the least loaded endpoint up. Raises the client's error; `EndpointDown` when the
        failure set the endpoint aside (the caller retries elsewhere without waiting)."""
        endpoint, client = await pool.acquire()
        try:
            # The client's documented raw `post`: the typed `chat.completions.create` spends ~2.5 ms of
            # CPU per request transforming params and building models, which caps throughput on 2 cores.
            resp = await client.post("/chat/completions", cast_to=httpx2.Response, body=body)
            reply = reply_from_completion(resp.json())
        except openai.APITimeoutError:
            raise  # slow, not down: a server under load answers late
        except openai.APIConnectionError as err:
            if pool.failed(endpoint, refused=True):
                raise EndpointDown(type(err).__name__) from err
            raise
        except openai.APIStatusError as err:
            if err.status_code >= 500 and pool.failed(endpoint, refused=False):
                raise EndpointDown(f"HTTP {err.status_code}") from err
            raise
        finally:
            await pool.release(endpoint, client)
        pool.succeeded(endpoint)
        return reply

    async def _with_retries(self, pool: EndpointPool, body: dict) -> ChatReply:
        last = ""
        for attempt in range(self.config.max_retries + 1):
            retry_after, wait = None, True
            try:
                return await self._send(pool, body)
            except EndpointDown as err:
                last, wait = f"{err} (endpoint set aside)", False
            except (openai.APITimeoutError, openai.APIConnectionError) as err:
                last = type(err).__name__
            except openai.APIStatusError as err:
                last = f"HTTP {err.status_code}"
                if err.status_code not in RETRYABLE and err.status_code < 500:
                    return ChatReply(None, finish_reason=None, error=f"{last}: {str(err)[:200]}")
                retry_after = retry_after_s(err.response.headers)
            if attempt < self.config.max_retries:
                self.retries += 1
                if wait:
                    self._backing_off += 1
                    try:
                        await asyncio.sleep(self._backoff(attempt, retry_after))
                    finally:
                        self._backing_off -= 1
        return ChatReply(None, finish_reason=None, error=f"{last} after {self.config.max_retries} retries")
