"""A request-level cache on disk: nothing is paid for twice.

The key is a hash of everything that determines a reply: the request body exactly as the transport sends
it (model, messages, sampling parameters with the per-item seed, response schema, `extra_body`) and the
transport's `endpoint`, which names where replies come from only where the body does not say it all (the
in-process `vllm` engine's arguments, `batch` results). For OpenAI-compatible servers it is one constant:
the model and the body decide the reply, not which replica of a list answered it (docs/design.md, LLM generation).
Entries live in one SQLite database per folder (`replies.sqlite`, Python's standard `sqlite3`) in WAL mode, one
row per reply, keyed by the request key: opening it reads nothing (a run with a 500k-entry history starts at
once, where the JSONL segments it replaces were parsed whole into memory on first use: benchmarks/README.md,
llm_cache.py), a lookup is one index probe, and concurrent processes sharing the folder are serialised by
SQLite's own locking (`busy_timeout`). Each reply is committed as it arrives (autocommit): a process killed
half way keeps every reply it received, since a committed transaction is in the WAL file before `put`
returns (`synchronous=NORMAL` gives that up only to a power cut, which costs requests, never a wrong reply).
Segments of the older format (`seg-*.jsonl`) are imported once, a torn last line skipped, and renamed to
`*.imported`. Why SQLite: it is in the standard library, an index on disk with atomic commits is exactly
what is needed, and nothing else here needs a server.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
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


DATABASE = "replies.sqlite"
LEGACY_SEGMENTS = "seg-*.jsonl"


class RequestCache:
    """Replies by request key in `folder/replies.sqlite` (module docstring); thread-safe, shared by processes."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.hits = 0
        self.misses = 0
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.folder / DATABASE, timeout=60, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("CREATE TABLE IF NOT EXISTS replies (k TEXT PRIMARY KEY, v TEXT NOT NULL) WITHOUT ROWID")
            self._import_segments(conn)
            self._conn = conn
        return self._conn

    def _import_segments(self, conn: sqlite3.Connection) -> None:
        """Move the older format's segments in (in name order, a later line winning, as they were read)."""
        for seg in sorted(self.folder.glob(LEGACY_SEGMENTS)):
            rows = []
            with open(seg, encoding="utf-8") as f:
                for line in f:
                    try:
                        entry = json.loads(line)
                        rows.append((entry["k"], json.dumps(entry["v"], sort_keys=True, ensure_ascii=False)))
                    except (json.JSONDecodeError, KeyError, TypeError):
                        continue  # a torn last line of a killed writer: requested again
            with conn:
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany("INSERT OR REPLACE INTO replies VALUES (?, ?)", rows)
            try:
                os.replace(seg, seg.with_name(seg.name + ".imported"))
            except FileNotFoundError:
                pass  # another process imported it at the same time (the rows are the same)
            # A big import leaves a big WAL that every later opener would scan: fold it into the database.
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __len__(self) -> int:
        with self._lock:
            return self._db().execute("SELECT COUNT(*) FROM replies").fetchone()[0]

    def get(self, key: str) -> dict | None:
        with self._lock:
            row = self._db().execute("SELECT v FROM replies WHERE k = ?", (key,)).fetchone()
            if row is None:
                self.misses += 1
                return None
            self.hits += 1
        return json.loads(row[0])

    def put(self, key: str, value: dict) -> None:
        text = json.dumps(value, sort_keys=True, ensure_ascii=False)
        with self._lock:
            self._db().execute("INSERT OR REPLACE INTO replies VALUES (?, ?)", (key, text))
