"""The LLM request cache (`generate.llm_cache.RequestCache`): SQLite in WAL mode, shared by processes, every
reply kept when its writer is killed, older JSONL segments imported once."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
from pathlib import Path

from generate.llm_cache import DATABASE, RequestCache


def _write(folder: str, prefix: str, n: int, kill: bool) -> None:
    cache = RequestCache(Path(folder))
    for i in range(n):
        cache.put(f"{prefix}-{i}", {"content": f"reply {i}", "prompt_tokens": i})
    if kill:
        os.kill(os.getpid(), signal.SIGKILL)  # no close, no exit handlers: what a killed run leaves


def test_replies_persist_across_processes_and_a_killed_writer_keeps_every_reply(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    writers = [ctx.Process(target=_write, args=(str(tmp_path), f"p{w}", 300, w == 0)) for w in range(3)]
    for p in writers:
        p.start()
    for p in writers:
        p.join(120)
    assert [p.exitcode for p in writers] == [-signal.SIGKILL, 0, 0]
    cache = RequestCache(tmp_path)
    assert len(cache) == 900  # three concurrent writers, one SIGKILLed after its last put
    assert cache.get("p0-299") == {"content": "reply 299", "prompt_tokens": 299}
    assert cache.get("p2-0") == {"content": "reply 0", "prompt_tokens": 0} and cache.get("absent") is None
    assert (cache.hits, cache.misses) == (2, 1)


def test_older_jsonl_segments_are_imported_once_a_torn_line_skipped(tmp_path):
    lines = [json.dumps({"k": f"k{i}", "v": {"content": str(i)}}) for i in range(5)]
    (tmp_path / "seg-1-aaaa.jsonl").write_text("\n".join(lines) + "\n" + '{"k": "torn", "v": {"cont')
    (tmp_path / "seg-2-bbbb.jsonl").write_text(json.dumps({"k": "k0", "v": {"content": "later"}}) + "\n")
    cache = RequestCache(tmp_path)
    assert len(cache) == 5 and cache.get("torn") is None
    assert cache.get("k0") == {"content": "later"}  # a later segment wins, as when segments were read
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(DATABASE)) == [
        "seg-1-aaaa.jsonl.imported", "seg-2-bbbb.jsonl.imported"]
    assert len(RequestCache(tmp_path)) == 5  # nothing imported twice
