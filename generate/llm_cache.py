"""A request-level cache on disk: nothing is paid for twice.

The key is a hash of everything that determines a reply: the request body exactly as the transport sends
it (model, messages, sampling parameters with the per-item seed, response schema, `extra_body`) and the
transport's `endpoint`, which names where replies come from only where the body does not say it all (the
in-process `vllm` engine's arguments, `batch` results). For OpenAI-compatible servers it is one constant:
the model and the body decide the reply, not which replica of a list answered it (docs/design.md, LLM generation).
Entries live in append-only segment files, one per writing process
(`seg-<pid>-<random>.jsonl`), one JSON line per reply, flushed as each reply arrives: a process killed
half way keeps every reply it received, and a torn last line (killed mid-write) fails to parse and is simply
requested again. Readers load every segment; writers never touch another process's segment, so concurrent
runs sharing the folder are safe. A line per reply costs one write; a file per reply (temp + rename) cost
four file-system calls, which on this machine was 1.5 ms of CPU per request and capped the client.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from kvqa.redact import redact_url

OPENAI_DEFAULT_BASE_URL = "https://api.openai.com/v1"


def endpoint_id(base_url: str | None) -> str:
    """The server part of a cache key: the base URL without userinfo and secret query parameters (so a
    rotated key or password keeps the cache) and its fragment (never sent), scheme and host lower-cased,
    no trailing slash; None is OpenAI's default URL.

    One function so that what counts as "the same server" can change in one place."""
    parts = urlsplit(redact_url(base_url or OPENAI_DEFAULT_BASE_URL, replacement=None))
    return urlunsplit((parts.scheme.lower(), parts.netloc.lower(), parts.path.rstrip("/"), parts.query, ""))


def request_key(body: dict, endpoint: str) -> str:
    """Hash of the request body as sent and the transport's `endpoint` (not a server URL: see above)."""
    payload = {"endpoint": endpoint, "body": body}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class RequestCache:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.hits = 0
        self.misses = 0
        self._index: dict[str, dict] | None = None
        self._segment = None
        self._lock = threading.Lock()

    def _load(self) -> dict[str, dict]:
        if self._index is None:
            self._index = {}
            for seg in sorted(self.folder.glob("seg-*.jsonl")):
                with open(seg) as f:
                    for line in f:
                        try:
                            entry = json.loads(line)
                            self._index[entry["k"]] = entry["v"]
                        except (json.JSONDecodeError, KeyError, TypeError):
                            continue  # a torn last line of a killed writer: requested again
        return self._index

    def __len__(self) -> int:
        return len(self._load())

    def get(self, key: str) -> dict | None:
        value = self._load().get(key)
        if value is None:
            self.misses += 1
        else:
            self.hits += 1
        return value

    def put(self, key: str, value: dict) -> None:
        line = json.dumps({"k": key, "v": value}, sort_keys=True, ensure_ascii=False) + "\n"
        with self._lock:
            if self._segment is None:
                self.folder.mkdir(parents=True, exist_ok=True)
                name = f"seg-{os.getpid()}-{uuid.uuid4().hex[:12]}.jsonl"
                self._segment = open(self.folder / name, "a", encoding="utf-8")
            self._segment.write(line)
            self._segment.flush()
            self._load()[key] = value
