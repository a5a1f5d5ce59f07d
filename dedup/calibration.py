"""Threshold calibration of the image-scope rule on question pairs it can get wrong.

The image scope only compares rows of one image with the same class set, so every pair here shares a
class set and the rule reduces to "cosine >= threshold": pairs of different class sets would be rejected
by the class gate whatever the threshold, and scoring them (as an earlier version did) made precision 1.0
by construction. "Same meaning" is labelled by construction instead (`calibration_pairs.yaml`): per class
set, meanings that list questions which ask the same thing. Different meanings of one class set are the
hard negatives: another value ("upper-left?" / "lower-right?"), an open question and a yes/no question
about one value, "all removed?" / "any removed?", "where in the image?" / "where in the colon?".

Sources of pairs (column `origin`):
- `catalog`: two phrasings of one class from the catalog (`questions` + verbatim `source_questions`), and
  two coordinated questions over the same two classes made of other phrasings in another order. All same.
- `hand`: pairs with at least one question of the hand-written file, same or different by its meanings.

`score` and `evaluate_threshold` take any labelled pair set and any decision, so a band rule (too close =
duplicate, too far = drifted) can be scored the same way.

The paraphrase band (dedup/near.py) has two bounds, scored by `evaluate_band` on two sets:
- lower bound (`dedup.threshold`): a paraphrase below it from the row it paraphrases has drifted. Scored on
  the pairs above as "drifted iff different meaning": every pair is a (row, paraphrase) the rule could see.
- upper bound (`dedup.paraphrase_max_similarity`): a paraphrase at or above it from a kept row adds
  nothing. Scored on `restatement_pairs.yaml`: faithful pairs only, labelled restatement (the same words up
  to one content word, function words, inflection, order) or rephrasing (two or more content words changed,
  or another construction). Different meanings are not in it: they are the lower bound's question.
"""

from __future__ import annotations

from itertools import combinations
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import yaml

from dedup.embed import EmbeddingCache, Encoder, embed_texts
from generate.template import compose_question
from kvqa.catalog import Catalog
from kvqa.text import normalise_text

CALIBRATION_PAIRS_PATH = Path(__file__).with_name("calibration_pairs.yaml")
RESTATEMENT_PAIRS_PATH = Path(__file__).with_name("restatement_pairs.yaml")
QUESTION_COLUMNS = ["group", "classes", "meaning", "question", "origin"]
PAIR_COLUMNS = ["a", "b", "classes", "same", "origin"]


def catalog_phrasings(catalog: Catalog, name: str) -> list[str]:
    qc = catalog.classes[name]
    return list(dict.fromkeys(qc.source_questions + qc.questions))


def labelled_questions(catalog: Catalog, path: Path = CALIBRATION_PAIRS_PATH,
                       composed_per_pair: int = 2) -> pd.DataFrame:
    """One row per (group, meaning, question): the hand-written groups, with the catalog's phrasings in the
    meaning marked `catalog: true`; a catalog-only group for every other class; and a group per pair of
    classes of `composed_per_pair` coordinated catalog questions (one meaning)."""
    spec = yaml.safe_load(Path(path).read_text())
    rows: list[tuple] = []
    hand_classes = set()
    for g, group in enumerate(spec["groups"]):
        classes = tuple(sorted(group["classes"]))
        unknown = set(classes) - set(catalog.classes)
        if unknown:
            raise ValueError(f"{path}: group {g} names classes not in the catalog: {sorted(unknown)}")
        for m, meaning in enumerate(group["meanings"]):
            if meaning.get("catalog"):
                if len(classes) != 1:
                    raise ValueError(f"{path}: group {g}: `catalog: true` needs a single class")
                hand_classes.add(classes[0])
                rows += [(f"hand-{g}", classes, m, q, "catalog") for q in catalog_phrasings(catalog, classes[0])]
            rows += [(f"hand-{g}", classes, m, q, "hand") for q in meaning["questions"]]
    names = list(catalog.classes)
    for name in names:
        if name not in hand_classes:
            rows += [(f"catalog-{name}", (name,), 0, q, "catalog") for q in catalog_phrasings(catalog, name)]
    for a, b in combinations(names, 2):
        pa, pb = catalog_phrasings(catalog, a), catalog_phrasings(catalog, b)
        for k in range(composed_per_pair):
            parts = [pa[k % len(pa)], pb[(k + 1) % len(pb)]]
            rows.append((f"composed-{a}+{b}", tuple(sorted((a, b))), 0,
                         compose_question(parts if k % 2 == 0 else parts[::-1]), "catalog"))
    out = pd.DataFrame(rows, columns=QUESTION_COLUMNS)
    return out.drop_duplicates(["group", "question"], ignore_index=True)


def calibration_pairs(catalog: Catalog, path: Path = CALIBRATION_PAIRS_PATH,
                      composed_per_pair: int = 2) -> pd.DataFrame:
    """Every pair of questions within a group (one class set): same iff same meaning; origin `catalog` when
    both questions are the catalog's, else `hand`."""
    rows = []
    for _, g in labelled_questions(catalog, path, composed_per_pair).groupby("group", sort=False):
        for x, y in combinations(g.itertuples(index=False), 2):
            origin = "catalog" if x.origin == y.origin == "catalog" else "hand"
            rows.append((x.question, y.question, x.classes, x.meaning == y.meaning, origin))
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)


def pair_similarities(pairs: pd.DataFrame, encoder: Encoder, cache: EmbeddingCache | None = None) -> np.ndarray:
    """Cosine similarity of each pair's normalised questions (each distinct text embedded once)."""
    texts = [normalise_text(t, punctuation=False) for t in list(pairs["a"]) + list(pairs["b"])]
    vectors = embed_texts(texts, encoder, cache)
    n = len(pairs)
    return np.einsum("ij,ij->i", vectors[:n], vectors[n:]) if n else np.zeros(0, np.float32)


def score(predicted_same: np.ndarray, same: np.ndarray) -> dict:
    """Precision, recall and false-positive rate of a same/different decision against the labels.

    Precision depends on the mix of the pair set (hand-made here); recall and the false-positive rate
    (different-meaning pairs called duplicates) do not."""
    predicted_same, same = np.asarray(predicted_same, bool), np.asarray(same, bool)
    tp = int((predicted_same & same).sum())
    fp = int((predicted_same & ~same).sum())
    fn = int((~predicted_same & same).sum())
    tn = int((~predicted_same & ~same).sum())
    return {"precision": round(tp / max(tp + fp, 1), 4), "recall": round(tp / max(tp + fn, 1), 4),
            "false_positive_rate": round(fp / max(fp + tn, 1), 4), "tp": tp, "fp": fp, "fn": fn, "tn": tn}


def evaluate_threshold(pairs: pd.DataFrame, encoder: Encoder, threshold: float,
                       similarities: np.ndarray | None = None) -> dict:
    """The image-scope rule (same class set, which every pair of `calibration_pairs` has, and cosine >=
    `threshold`) scored on all pairs and per origin. Pass `similarities` (from `pair_similarities`) to
    score several thresholds with one embedding."""
    sims = pair_similarities(pairs, encoder) if similarities is None else similarities
    predicted, same = sims >= threshold, pairs["same"].to_numpy(bool)
    out = {"threshold": threshold, "pairs": len(pairs), "same": int(same.sum()), "different": int((~same).sum()),
           "all": score(predicted, same)}
    for origin in ("catalog", "hand"):
        mask = (pairs["origin"] == origin).to_numpy()
        out[origin] = score(predicted[mask], same[mask])
    return out


def threshold_sweep(pairs: pd.DataFrame, encoder: Encoder, thresholds: Sequence[float]) -> pd.DataFrame:
    """The figures of benchmarks/README.md's calibration table, one row per threshold."""
    sims = pair_similarities(pairs, encoder)
    rows = []
    for t in thresholds:
        r = evaluate_threshold(pairs, encoder, t, sims)
        rows.append({"threshold": t, "catalog_recall": r["catalog"]["recall"], "hand_recall": r["hand"]["recall"],
                     "hand_precision": r["hand"]["precision"],
                     "false_positive_rate": r["all"]["false_positive_rate"]})
    return pd.DataFrame(rows)


RESTATEMENT_COLUMNS = ["a", "b", "classes", "restatement"]


def restatement_pairs(catalog: Catalog, path: Path = RESTATEMENT_PAIRS_PATH) -> pd.DataFrame:
    """(question, restatement or rephrasing) pairs of `restatement_pairs.yaml`: `restatement` is True when
    the second adds nothing to the first."""
    spec = yaml.safe_load(Path(path).read_text())
    rows = []
    for g, group in enumerate(spec["groups"]):
        classes = tuple(sorted(group["classes"]))
        unknown = set(classes) - set(catalog.classes)
        if unknown:
            raise ValueError(f"{path}: group {g} names classes not in the catalog: {sorted(unknown)}")
        q = group["question"]
        rows += [(q, r, classes, True) for r in group["restatements"]]
        rows += [(q, r, classes, False) for r in group["rephrasings"]]
    return pd.DataFrame(rows, columns=RESTATEMENT_COLUMNS)


def evaluate_band(meaning: pd.DataFrame, restatements: pd.DataFrame, encoder: Encoder, threshold: float,
                  max_similarity: float, meaning_sims: np.ndarray | None = None,
                  restatement_sims: np.ndarray | None = None) -> dict:
    """The paraphrase band scored on both bounds (see the module docstring).

    `drift`: "drifted" (cosine < `threshold`) against "different meaning" on `meaning` (calibration_pairs):
    recall = drifted paraphrases caught, false-positive rate = faithful paraphrases rejected as drifted.
    `duplicate`: "duplicate" (normalised texts equal, or cosine >= `max_similarity`) against "restatement"
    on `restatements` (restatement_pairs): recall = restatements removed, false-positive rate = rephrasings
    removed. `rephrasings_kept`: share of the rephrasings inside the band (neither drifted nor duplicate),
    what a faithful, reworded paraphrase meets."""
    ms = pair_similarities(meaning, encoder) if meaning_sims is None else meaning_sims
    rs = pair_similarities(restatements, encoder) if restatement_sims is None else restatement_sims
    equal = np.array([normalise_text(a, punctuation=False) == normalise_text(b, punctuation=False)
                      for a, b in zip(restatements["a"], restatements["b"])], bool)
    duplicate = equal | (rs >= max_similarity)
    restatement = restatements["restatement"].to_numpy(bool)
    in_band = ~duplicate & (rs >= threshold)
    return {"threshold": threshold, "max_similarity": max_similarity,
            "drift": score(ms < threshold, ~meaning["same"].to_numpy(bool)),
            "duplicate": score(duplicate, restatement),
            "rephrasings_kept": round(float(in_band[~restatement].mean()), 4) if (~restatement).any() else 0.0}


def band_sweep(meaning: pd.DataFrame, restatements: pd.DataFrame, encoder: Encoder,
               max_similarities: Sequence[float], threshold: float) -> pd.DataFrame:
    """The upper-bound table of benchmarks/README.md: one row per `max_similarity`, at `threshold`."""
    ms, rs = pair_similarities(meaning, encoder), pair_similarities(restatements, encoder)
    rows = []
    for m in max_similarities:
        r = evaluate_band(meaning, restatements, encoder, threshold, m, ms, rs)
        d = r["duplicate"]
        rows.append({"max_similarity": m, "restatement_recall": d["recall"], "duplicate_precision": d["precision"],
                     "rephrasings_removed": d["false_positive_rate"], "rephrasings_kept": r["rephrasings_kept"]})
    return pd.DataFrame(rows)
