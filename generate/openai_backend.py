"""`openai` transport: any OpenAI-compatible chat server (OpenAI, `vllm serve`, SGLang, Ollama, llama.cpp)
through the official async `openai` client.

Concurrency is bounded by a pool of slots, a semaphore in effect (a slow request never holds back a whole
slice); each slot belongs to one of several clients of at most `CONNECTIONS_PER_CLIENT` connections,
because httpx scans every connection of its pool on each request and one pool of 64 cost ~1 ms of CPU per
request here. Each request has a timeout; 408/409/429/5xx replies, timeouts and connection errors are retried with exponential backoff and
full jitter, honouring `Retry-After` / `retry-after-ms`. The client's own retries are off so that every
retry is ours, counted and bounded. Other errors fail the request (and so reject its plan) at once.
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import random
import time
from typing import Sequence

import httpx2
import openai
from tqdm.auto import tqdm

from generate.llm import ChatReply, ChatRequest, OnReply
from generate.llm_cache import OPENAI_DEFAULT_BASE_URL, endpoint_id
from kvqa.config import LLMConfig

RETRYABLE = {408, 409, 429}
CONNECTIONS_PER_CLIENT = 8


def resolved_base_url(config: LLMConfig) -> str:
    """The server the requests go to: `base_url`, else `OPENAI_BASE_URL` (which the openai client would
    read on its own), else OpenAI. Resolved here so that the cache key names the server actually used."""
    return config.base_url or os.environ.get("OPENAI_BASE_URL") or OPENAI_DEFAULT_BASE_URL


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


class OpenAITransport:
    name = "openai"

    body_defaults: dict = {}

    def __init__(self, config: LLMConfig):
        self.config = config
        self.base_url = resolved_base_url(config)
        self.endpoint = endpoint_id(self.base_url)
        self.retries = 0

    def complete(self, requests: Sequence[ChatRequest], stage: str, on_reply: OnReply) -> list[ChatReply]:
        return asyncio.run(self._complete(requests, stage, on_reply))

    async def _complete(self, requests: Sequence[ChatRequest], stage: str, on_reply: OnReply) -> list[ChatReply]:
        cfg = self.config
        n_clients = -(-cfg.concurrency // CONNECTIONS_PER_CLIENT)
        limits = httpx2.Limits(max_connections=CONNECTIONS_PER_CLIENT, max_keepalive_connections=CONNECTIONS_PER_CLIENT)
        # A local server needs no key; the client still wants a non-empty string.
        clients = [openai.AsyncOpenAI(base_url=self.base_url, api_key=os.environ.get(cfg.api_key_env) or "EMPTY",
                                      max_retries=0, timeout=cfg.timeout_s,
                                      http_client=openai.DefaultAsyncHttpxClient(limits=limits))
                   for _ in range(n_clients)]
        slots: asyncio.Queue = asyncio.Queue()
        for i in range(cfg.concurrency):
            slots.put_nowait(clients[i % n_clients])
        tokens, start = 0, time.perf_counter()
        bar = tqdm(total=len(requests), desc=f"{stage} ({cfg.model})", unit="req", mininterval=1.0,
                   disable=len(requests) < 200)

        async def one(req: ChatRequest) -> ChatReply:
            nonlocal tokens
            client = await slots.get()
            try:
                reply = await self._with_retries(client, req.body)
            finally:
                slots.put_nowait(client)
            on_reply(req, reply)
            tokens += reply.completion_tokens
            bar.update(1)
            bar.set_postfix_str(f"{tokens / max(time.perf_counter() - start, 1e-9):.0f} tok/s", refresh=False)
            return reply

        try:
            return list(await asyncio.gather(*(one(r) for r in requests)))
        finally:
            bar.close()
            for client in clients:
                await client.close()

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.config.backoff_max_s)
        cap = min(self.config.backoff_max_s, self.config.backoff_base_s * 2 ** attempt)
        return random.uniform(0, cap)  # full jitter: timing only, never the data

    async def _with_retries(self, client: openai.AsyncOpenAI, body: dict) -> ChatReply:
        last = ""
        for attempt in range(self.config.max_retries + 1):
            retry_after = None
            try:
                # The client's documented raw `post`: the typed `chat.completions.create` spends ~2.5 ms of
                # CPU per request transforming params and building models, which caps throughput on 2 cores.
                resp = await client.post("/chat/completions", cast_to=httpx2.Response, body=body)
                return reply_from_completion(resp.json())
            except (openai.APITimeoutError, openai.APIConnectionError) as err:
                last = type(err).__name__
            except openai.APIStatusError as err:
                last = f"HTTP {err.status_code}"
                if err.status_code not in RETRYABLE and err.status_code < 500:
                    return ChatReply(None, finish_reason=None, error=f"{last}: {str(err)[:200]}")
                retry_after = retry_after_s(err.response.headers)
            if attempt < self.config.max_retries:
                self.retries += 1
                await asyncio.sleep(self._backoff(attempt, retry_after))
        return ChatReply(None, finish_reason=None, error=f"{last} after {self.config.max_retries} retries")
