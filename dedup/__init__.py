"""Semantic deduplication of QA pairs: embeddings (sentence-transformers, cached) + faiss.

`deduplicate` removes exact and near duplicates within the configured scopes and returns the kept rows, a
duplicates table that says why each removed row went, and the figures for the run report and the card.
`cross_split_leakage` reports test rows that repeat a train row's meaning on a train image near their own.
"""

from dedup.calibration import calibration_pairs, evaluate_threshold
from dedup.embed import (PACKAGED_MODEL, EmbeddingCache, OnnxEncoder, SentenceTransformerEncoder, embed_texts,
                         encoder_for)
from dedup.near import DUPLICATE_COLUMNS, LEAKAGE_COLUMNS, cross_split_leakage
from dedup.run import deduplicate, question_vectors

__all__ = ["DUPLICATE_COLUMNS", "LEAKAGE_COLUMNS", "PACKAGED_MODEL", "EmbeddingCache", "OnnxEncoder",
           "SentenceTransformerEncoder", "calibration_pairs", "cross_split_leakage", "deduplicate",
           "embed_texts", "encoder_for", "evaluate_threshold", "question_vectors"]
