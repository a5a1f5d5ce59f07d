"""Threshold calibration on a labelled set of question pairs built from the catalog.

Same question: two phrasings of one class (the catalog's phrasings and the verbatim source questions),
and two coordinated questions over the same two classes (other phrasings, other order). Different
question: phrasings of two different classes ("Is there text?" / "Is there a green/black box artefact?"),
and coordinated questions whose class pairs differ in one class.

Two decisions are scored at a threshold: the embedding alone (cosine >= t), and the rule the image scope
applies (same class set and cosine >= t). all-MiniLM-L6-v2 alone cannot tell "Which landmarks are visible?"
from "Where is the landmark?" (0.87) while two true paraphrases can score 0.42 -- which is why the image
scope only compares rows whose class sets are equal, and why the threshold is set for recall.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pandas as pd

from dedup.embed import Encoder, embed_texts, normalise_question
from generate.template import compose_question
from kvqa.catalog import Catalog


def calibration_pairs(catalog: Catalog, composed_per_pair: int = 3) -> pd.DataFrame:
    phrasings = {name: list(dict.fromkeys(qc.questions + qc.source_questions))
                 for name, qc in catalog.classes.items()}
    rows = []
    singles = [(name, q) for name, qs in phrasings.items() for q in qs]
    for (ca, qa), (cb, qb) in combinations(singles, 2):
        rows.append((qa, qb, (ca,), (cb,), ca == cb))
    names = list(phrasings)
    composed = []
    for a, b in combinations(names, 2):
        for k in range(composed_per_pair):
            qa_, qb_ = phrasings[a][k % len(phrasings[a])], phrasings[b][(k + 1) % len(phrasings[b])]
            text = compose_question([qa_, qb_] if k % 2 == 0 else [qb_, qa_])
            composed.append((tuple(sorted((a, b))), text))
    for (ka, ta), (kb, tb) in combinations(composed, 2):
        shared = len(set(ka) & set(kb))
        if ka == kb or shared == 1:
            rows.append((ta, tb, ka, kb, ka == kb))
    return pd.DataFrame(rows, columns=["a", "b", "classes_a", "classes_b", "same"])


def evaluate_threshold(pairs: pd.DataFrame, encoder: Encoder, threshold: float) -> dict:
    """Precision and recall at `threshold` of the embedding alone and of the image-scope rule."""
    va = embed_texts([normalise_question(t) for t in pairs["a"]], encoder, None)
    vb = embed_texts([normalise_question(t) for t in pairs["b"]], encoder, None)
    sims = np.einsum("ij,ij->i", va, vb)
    truth = pairs["same"].to_numpy()
    same_classes = np.array([set(a) == set(b) for a, b in zip(pairs["classes_a"], pairs["classes_b"])])
    out = {"threshold": threshold, "pairs": len(pairs), "positives": int(truth.sum())}
    for name, pred in (("embedding", sims >= threshold), ("rule", (sims >= threshold) & same_classes)):
        tp = int((pred & truth).sum())
        fp = int((pred & ~truth).sum())
        out[name] = {"precision": round(tp / max(tp + fp, 1), 4), "recall": round(tp / max(int(truth.sum()), 1), 4)}
    return out
