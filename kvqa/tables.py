"""Table IO shared by every stage: atomic parquet/JSON writes, digests, seeded generators.

Writes go to a temporary file in the target folder and are renamed into place, so a killed run never
leaves a half-written table that a later run could mistake for a finished one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

QUARANTINE_COLUMNS = ["stage", "source", "key", "reason", "detail", "raw"]
TEMP_SUFFIX = ".tmp"
# atomic_path's temporary names: "." + target name + "." + mkstemp's 8 random characters + ".tmp"
ORPHAN_TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}" + re.escape(TEMP_SUFFIX) + "$")
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; published files should be readable
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def remove_orphan_temps(folder: Path) -> list[Path]:
    """Delete the temporary files `atomic_path` left under `folder` (any depth); return what was removed.

    A SIGKILL between `mkstemp` and the rename leaves `.<name>.<random>.tmp` behind (a torn 190 MB parquet
    shard in `release/`, half a JPEG in `augmented/`). Nothing reads them, but they fill the disk and would
    be uploaded with the folder. Call it when a run starts: a run folder has one writer at a time, so any
    such file is an earlier run's leftover, never a write in progress. Files named otherwise are kept.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in sorted(folder.rglob(f".*{TEMP_SUFFIX}")):
        if ORPHAN_TEMP_NAME.match(path.name) and path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def write_table(df: pd.DataFrame, path: Path, schema: pa.Schema | None = None) -> Path:
    """Write `df` as zstd parquet, atomically. The columns are combined into one chunk first: pandas'
    arrow-backed strings keep the chunks of the frames they were concatenated from, and the parquet writer
    cuts pages (and falls back from dictionary encoding) along them, so the same rows built from 8 or 10
    chunks would give other bytes."""
    table = pa.Table.from_pandas(df, schema=schema, preserve_index=False).combine_chunks()
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return Path(path)


def write_table_pieces(pieces: Iterable[pa.Table], path: Path, schema: pa.Schema, row_group_rows: int) -> int:
    """Write a table that arrives in pieces as zstd parquet, atomically, never holding more than one row
    group of it; return its rows.

    Row groups hold exactly `row_group_rows` rows (the last fewer) whatever the pieces, and each is one
    chunk when written (see `write_table`), so the same rows give the same bytes however they were cut;
    a table of at most `row_group_rows` rows gives `write_table`'s bytes."""
    rows, pending = 0, []

    def flush(limit: int | None) -> list[pa.Table]:
        whole = pa.concat_tables(pending).combine_chunks()
        n = whole.num_rows if limit is None else limit
        writer.write_table(whole.slice(0, n))
        return [whole.slice(n)] if n < whole.num_rows else []

    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        for piece in pieces:
            if piece.num_rows:  # an empty piece would otherwise make a row group of its own
                pending.append(piece.select(schema.names).cast(schema))
                rows += piece.num_rows
            while sum(t.num_rows for t in pending) >= row_group_rows:
                pending = flush(row_group_rows)
        if pending or not rows:
            pending = pending or [schema.empty_table()]
            flush(None)
    return rows


def read_table(path: Path) -> pd.DataFrame:
    return pq.read_table(path).to_pandas()


def first_rows(path: Path, n: int) -> pd.DataFrame:
    """The first `n` rows of a parquet table, reading no more row groups than they need."""
    parts, left = [], n
    for batch in pq.ParquetFile(path).iter_batches(batch_size=max(n, 1)) if n > 0 else ():
        parts.append(batch.slice(0, left))
        left -= parts[-1].num_rows
        if left <= 0:
            break
    return pa.Table.from_batches(parts, pq.read_schema(path)).to_pandas()


def write_json(obj: object, path: Path) -> Path:
    return write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", path)


def write_text(text: str, path: Path) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def stable_hash(*parts: object) -> str:
    """A hex digest of the parts, independent of process, platform and PYTHONHASHSEED."""
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()


def rng_for(seed: int, *key: object) -> np.random.Generator:
    """A generator seeded by the config seed and a stable key, never by process order."""
    entropy = int(stable_hash(seed, *key)[:32], 16)
    return np.random.default_rng(np.random.SeedSequence(entropy))


class HashDraws:
    """Cheap deterministic draws from sha256(seed, key, block): for hot loops where building a numpy
    Generator per item would dominate (the template realizer draws a handful of numbers per plan)."""

    def __init__(self, seed: int, *key: object):
        self._prefix = "\x1f".join(map(str, (seed, *key))).encode()
        self._block = 0
        self._buf = b""

    def below(self, n: int) -> int:
        """A uniform integer in [0, n) (bias < n / 2**64)."""
        if len(self._buf) < 8:
            self._buf += hashlib.sha256(self._prefix + b"\x1f%d" % self._block).digest()
            self._block += 1
        value, self._buf = int.from_bytes(self._buf[:8], "little"), self._buf[8:]
        return value % n

    def permutation(self, n: int) -> list[int]:
        """A uniform shuffle of range(n)."""
        return self.sample(n, n)

    def sample(self, n: int, k: int) -> list[int]:
        """k distinct integers of range(n), uniformly, in draw order (partial Fisher-Yates)."""
        items = list(range(n))
        for i in range(min(k, n)):
            j = i + self.below(n - i)
            items[i], items[j] = items[j], items[i]
        return items[:k]


def plain_boxes(boxes) -> list[dict]:
    """Boxes as plain dicts with int coordinates: parquet hands list<struct> columns back as arrays of
    dicts with numpy-typed values, which neither JSON nor a strict Arrow schema takes."""
    return [{k: (v if k == "label" else int(v)) for k, v in b.items()} for b in boxes]


def quarantine_frame(rows: list[dict]) -> pd.DataFrame:
    """Rows rejected by a stage, each with a machine-readable reason and a human-readable detail."""
    return pd.DataFrame(rows, columns=QUARANTINE_COLUMNS).astype(str)
