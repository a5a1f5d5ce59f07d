"""The LLM request cache at full size: 500,000 replies (a full regeneration's compose, judge, paraphrase and
explain requests with room to spare), SQLite (`generate.llm_cache.RequestCache`) against the JSONL segments it
replaced, which a run parsed whole into a dict on its first lookup.

Each measurement runs in a fresh process (its peak RSS is its own): for the segments, reading them into a dict
(what the old cache did before its first reply); for SQLite, opening the cache and the first lookup, then
10,000 lookups of random keys. The one-time import of the segments into SQLite is timed too. Values are
reply records of the size the compose stage stores (≈ 480 bytes of JSON).

    .venv/bin/python benchmarks/llm_cache.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, peak_rss_mib, print_json, print_table

LOOKUPS = 10_000


def reply(i: int) -> dict:
    content = json.dumps({"question": f"Is there a polyp in image {i}, and where is it?",
                          "answer": "Yes, one polyp in the lower-left region, about 5 to 10 mm, pink and flat."})
    return {"content": content, "finish_reason": "stop", "prompt_tokens": 285 + i % 40, "completion_tokens": 52,
            "model": "Qwen/Qwen3-8B", "error": None, "latency_s": 0.1 + (i % 7) / 100}


def write_segments(folder: Path, n: int, writers: int = 8) -> None:
    """`n` replies in `writers` segments of the old format (one JSON line per reply)."""
    folder.mkdir(parents=True)
    files = [open(folder / f"seg-{w}-bench.jsonl", "w", encoding="utf-8") for w in range(writers)]
    for i in range(n):
        files[i % writers].write(json.dumps({"k": f"{i:064x}", "v": reply(i)}, sort_keys=True) + "\n")
    for f in files:
        f.close()


def measure(what: str, folder: Path, n: int) -> dict:
    """Run in this process (a fresh one per measurement): the figures of `what` on `folder` (the modules are
    imported before the clock starts)."""
    sys.path.insert(0, str(ROOT))
    from generate.llm_cache import RequestCache

    before = peak_rss_mib()
    t0 = time.perf_counter()
    if what == "segments":  # the old cache's first lookup: every segment parsed into one dict
        index = {}
        for seg in sorted(folder.glob("seg-*.jsonl")):
            with open(seg) as f:
                for line in f:
                    entry = json.loads(line)
                    index[entry["k"]] = entry["v"]
        opened = time.perf_counter() - t0
        keys = [f"{random.Random(i).randrange(n):064x}" for i in range(LOOKUPS)]
        t1 = time.perf_counter()
        assert all(index.get(k) is not None for k in keys)
    else:
        cache = RequestCache(folder)
        assert cache.get(f"{0:064x}") is not None
        opened = time.perf_counter() - t0
        keys = [f"{random.Random(i).randrange(n):064x}" for i in range(LOOKUPS)]
        t1 = time.perf_counter()
        assert all(cache.get(k) is not None for k in keys)
    lookup_us = (time.perf_counter() - t1) / LOOKUPS * 1e6
    return {"open_s": round(opened, 3), "lookup_us": round(lookup_us, 1),
            "rss_added_mib": round(peak_rss_mib() - before, 1)}


def in_subprocess(what: str, folder: Path, n: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--measure", what, str(folder), str(n)], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="50,000 replies instead of 500,000")
    ap.add_argument("--measure", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        what, folder, n = args.measure
        print(json.dumps(measure(what, Path(folder), int(n))))
        return
    n = 50_000 if args.quick else 500_000
    with tempfile.TemporaryDirectory() as tmp:
        segments, db = Path(tmp) / "segments", Path(tmp) / "sqlite"
        write_segments(segments, n)
        seg_bytes = sum(p.stat().st_size for p in segments.iterdir())
        old = in_subprocess("segments", segments, n)
        write_segments(db, n)  # the same replies, imported on first open (timed: a one-time cost)
        sys.path.insert(0, str(ROOT))
        from generate.llm_cache import DATABASE, RequestCache

        t0 = time.perf_counter()
        imported = RequestCache(db)
        assert len(imported) == n
        imported_s = round(time.perf_counter() - t0, 2)
        imported.close()
        db_bytes = sum(p.stat().st_size for p in db.iterdir() if p.name.startswith(DATABASE))
        new = in_subprocess("sqlite", db, n)
    print_table(f"LLM request cache, {n:,} replies (each measurement in a fresh process)", [
        ("", "open + first lookup", "lookup", "RSS added", "on disk"),
        ("JSONL segments (before)", f"{old['open_s']:.2f} s", f"{old['lookup_us']} µs", f"{old['rss_added_mib']} MiB",
         f"{seg_bytes / 2**20:.0f} MiB"),
        ("SQLite WAL (now)", f"{new['open_s']:.3f} s", f"{new['lookup_us']} µs", f"{new['rss_added_mib']} MiB",
         f"{db_bytes / 2**20:.0f} MiB"),
        ("one-time import of the segments", f"{imported_s} s", "", "", ""),
    ])
    print_json({"benchmark": "llm_cache", "quick": args.quick, "replies": n, "segments": old, "sqlite": new,
                "import_s": imported_s, "open_speedup": round(old["open_s"] / max(new["open_s"], 1e-6), 1),
                "segments_mib": round(seg_bytes / 2**20, 1), "sqlite_mib": round(db_bytes / 2**20, 1)})


if __name__ == "__main__":
    main()
