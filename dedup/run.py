"""The dedup step over a QA table: normalise, embed (cached), remove duplicates and drifted paraphrases per
scope, count."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd

from dedup.embed import BlockRunner, EmbeddingCache, Encoder, embed_texts
from dedup.near import DUPLICATE_COLUMNS, global_recurrence, image_scope_duplicates, is_paraphrase
from kvqa.config import DedupConfig
from kvqa.text import normalise_text


def question_vectors(qa: pd.DataFrame, encoder: Encoder, cache: EmbeddingCache | None,
                     run_blocks: BlockRunner | None = None) -> tuple[list[str], np.ndarray]:
    texts = [normalise_text(q, punctuation=False) for q in qa["question"]]
    return texts, embed_texts(texts, encoder, cache, run_blocks)


def deduplicate(qa: pd.DataFrame, config: DedupConfig, encoder: Encoder, cache: EmbeddingCache | None,
                seed: int, run_blocks: BlockRunner | None = None) -> tuple[pd.DataFrame, pd.DataFrame, dict, dict]:
    """Return (kept rows, duplicates table, figures, timings in s and texts embedded). Input rows = kept +
    duplicates. `run_blocks` embeds elsewhere (Dask workers), with the same vectors."""
    qa = qa.reset_index(drop=True)
    before, t0 = encoder.texts_encoded, time.perf_counter()
    texts, vectors = question_vectors(qa, encoder, cache, run_blocks)
    figures: dict = {"model": encoder.model_id, "threshold": config.threshold,
                     "paraphrase_max_similarity": config.paraphrase_max_similarity, "scopes": list(config.scopes),
                     "rows_in": len(qa), "paraphrases_in": int(is_paraphrase(qa).sum()),
                     "distinct_texts": len(set(texts))}
    # How many texts missed the cache depends on the cache's history, not on the inputs: not a figure.
    timings = {"embed_s": time.perf_counter() - t0, "texts_embedded": encoder.texts_encoded - before}
    dups = (image_scope_duplicates(qa, texts, vectors, config.threshold, config.paraphrase_max_similarity)
            if "image" in config.scopes else [])
    if "global" in config.scopes:
        t0 = time.perf_counter()
        removed = {d["qa_id"] for d in dups}
        keep = ~qa["qa_id"].isin(removed).to_numpy()
        figures["global"], capped = global_recurrence(
            qa[keep], [t for t, k in zip(texts, keep) if k], vectors[keep], config.global_threshold,
            config.max_repeats, seed)
        dups += capped
        timings["global_s"] = time.perf_counter() - t0
    duplicates = pd.DataFrame(dups, columns=DUPLICATE_COLUMNS).sort_values("qa_id", kind="stable")
    kept = qa[~qa["qa_id"].isin(duplicates["qa_id"])].reset_index(drop=True)
    figures.update({"rows_kept": len(kept), "paraphrases_kept": int(is_paraphrase(kept).sum()),
                    "rows_removed": len(duplicates),
                    "removed_by": {f"{s}/{r}": int(n) for (s, r), n in
                                   duplicates.groupby(["scope", "rule"]).size().items()}})
    # Timings are returned apart: figures go into reports and cards, which must not change between runs.
    return kept, duplicates.reset_index(drop=True), figures, timings
