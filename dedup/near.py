"""Exact and near-duplicate removal, recurrence figures and the leakage report.

Scopes (config `dedup.scopes`):
- `image`: rows of one image with the same set of question classes ask the same thing; among them a row
  is a duplicate of the best-matching row kept before it when their normalised questions are equal
  (rule `exact`) or their embeddings' cosine similarity is at least `threshold` (rule `near`). Rows are
  visited in keep order: a plan's own row before its paraphrases (`-pN`), then by `qa_id` -- so the same
  survivor is chosen on every run.
- `global`: how often near-identical phrasings recur across the release (exact recurrence, groups of
  distinct phrasings at cosine >= `global_threshold` found with faiss, a histogram of each phrasing's
  nearest-neighbour similarity), and, with `max_repeats`, a cap on how many rows one phrasing may have
  (extra rows removed by a seeded, order-free choice; rule `cap`).
- `cross-split`: test rows whose image (by content hash, so the same frame under two ids counts) and
  meaning (same classes, cosine >= `threshold`) also occur in train. Reported, not removed.

Nothing is lost: the duplicates table says for every removed row which row it duplicates, how similar they
are, and under which scope and rule. Input rows = kept + duplicates.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import pandas as pd

from kvqa.tables import stable_hash

DUPLICATE_COLUMNS = ["qa_id", "duplicate_of", "similarity", "scope", "rule"]
LEAKAGE_COLUMNS = ["test_qa_id", "train_qa_id", "similarity", "image_sha256"]
HIST_BINS = np.round(np.linspace(0.0, 1.0, 21), 2)
SEARCH_CHUNK = 2048  # faiss: IndexHNSWFlat.range_search aborts at >= 4,096 queries a call; stay well below


def keep_order(qa_ids: pd.Series) -> np.ndarray:
    """Positions in keep order: plan rows before their paraphrases, then by qa_id."""
    is_variant = qa_ids.str.contains(r"-p\d+$").to_numpy()
    return np.lexsort((qa_ids.to_numpy(), is_variant))


def image_scope_duplicates(qa: pd.DataFrame, texts: list[str], vectors: np.ndarray, threshold: float) -> list[dict]:
    """Duplicates among the rows of one image with the same class set (see module docstring)."""
    order = keep_order(qa["qa_id"])
    groups: dict[tuple, list[int]] = defaultdict(list)
    keys = list(zip(qa["source"], qa["img_id"], (tuple(sorted(c)) for c in qa["question_class"])))
    for i in order:
        groups[keys[i]].append(int(i))
    out = []
    ids = qa["qa_id"].tolist()
    for members in groups.values():
        if len(members) < 2:
            continue
        kept: list[int] = []
        for i in members:
            exact = next((k for k in kept if texts[k] == texts[i]), None)
            if exact is not None:
                out.append({"qa_id": ids[i], "duplicate_of": ids[exact], "similarity": 1.0, "scope": "image",
                            "rule": "exact"})
                continue
            if kept:
                sims = vectors[kept] @ vectors[i]
                best = int(np.argmax(sims))
                if sims[best] >= threshold:
                    out.append({"qa_id": ids[i], "duplicate_of": ids[kept[best]],
                                "similarity": round(float(sims[best]), 4), "scope": "image", "rule": "near"})
                    continue
            kept.append(i)
    return out


def nearest_neighbours(vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact k-NN by inner product (cosine on normalised vectors) with faiss, in chunks."""
    import faiss

    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    sims, idx = [], []
    for start in range(0, len(vectors), SEARCH_CHUNK):
        s, i = index.search(vectors[start:start + SEARCH_CHUNK], k)
        sims.append(s)
        idx.append(i)
    return np.vstack(sims), np.vstack(idx)


def global_recurrence(qa: pd.DataFrame, texts: list[str], vectors: np.ndarray, global_threshold: float,
                      max_repeats: int | None, seed: int) -> tuple[dict, list[dict]]:
    """Recurrence figures of the phrasings across the release, and the rows over the cap."""
    counts = Counter(texts)
    distinct = list(counts)
    first_row = {}
    for i, t in enumerate(texts):
        first_row.setdefault(t, i)
    figures: dict = {"rows": len(texts), "distinct_phrasings": len(distinct),
                     "rows_with_recurring_phrasing": int(sum(c for c in counts.values() if c > 1)),
                     "most_repeated": [[t, c] for t, c in counts.most_common(5)]}
    if len(distinct) > 1:
        dvec = vectors[[first_row[t] for t in distinct]]
        sims, idx = nearest_neighbours(dvec, min(16, len(distinct)))
        nn = np.where(idx[:, 0] == np.arange(len(distinct)), sims[:, 1], sims[:, 0])
        hist, _ = np.histogram(np.clip(nn, 0, 1), bins=HIST_BINS)
        parent = list(range(len(distinct)))

        def find(a: int) -> int:
            while parent[a] != a:
                parent[a] = parent[parent[a]]
                a = parent[a]
            return a

        for a, (row_s, row_i) in enumerate(zip(sims, idx)):
            for s, b in zip(row_s, row_i):
                if b > a and s >= global_threshold:
                    parent[find(b)] = find(a)
        sizes = Counter(find(a) for a in range(len(distinct)))
        figures.update({
            "near_identical_threshold": global_threshold,
            "phrasings_in_near_identical_groups": int(sum(n for n in sizes.values() if n > 1)),
            "largest_near_identical_group": int(max(sizes.values())),
            "nearest_neighbour_histogram": {f"{lo:.2f}-{hi:.2f}": int(n)
                                            for lo, hi, n in zip(HIST_BINS[:-1], HIST_BINS[1:], hist)},
        })
    capped: list[dict] = []
    if max_repeats is not None:
        rows_by_text: dict[str, list[int]] = defaultdict(list)
        for i, t in enumerate(texts):
            rows_by_text[t].append(i)
        ids = qa["qa_id"].tolist()
        for rows in rows_by_text.values():
            if len(rows) > max_repeats:
                rows = sorted(rows, key=lambda i: stable_hash(seed, "cap", ids[i]))
                for i in rows[max_repeats:]:
                    capped.append({"qa_id": ids[i], "duplicate_of": ids[rows[0]], "similarity": 1.0,
                                   "scope": "global", "rule": "cap"})
        figures["removed_by_cap"] = len(capped)
    return figures, capped


def cross_split_leakage(qa: pd.DataFrame, vectors: np.ndarray, splits: pd.DataFrame, images: pd.DataFrame,
                        threshold: float) -> pd.DataFrame:
    """Test rows whose image content and meaning also occur in train (see module docstring)."""
    rows = (qa.reset_index(drop=True).reset_index(names="row_pos")
            .merge(splits[["source", "img_id", "split"]], on=["source", "img_id"])
            .merge(images[["source", "img_id", "sha256"]], on=["source", "img_id"]))
    rows["classes_key"] = [tuple(sorted(c)) for c in rows["question_class"]]
    train = rows[rows.split == "train"].groupby(["sha256", "classes_key"])
    out = []
    train_groups = {k: g for k, g in train}
    for r in rows[rows.split == "test"].itertuples():
        g = train_groups.get((r.sha256, r.classes_key))
        if g is None:
            continue
        sims = vectors[g["row_pos"].to_numpy()] @ vectors[r.row_pos]
        best = int(np.argmax(sims))
        if sims[best] >= threshold:
            out.append({"test_qa_id": r.qa_id, "train_qa_id": g["qa_id"].iloc[best],
                        "similarity": round(float(sims[best]), 4), "image_sha256": r.sha256})
    return pd.DataFrame(out, columns=LEAKAGE_COLUMNS)
