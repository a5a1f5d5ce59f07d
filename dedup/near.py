"""Exact and near-duplicate removal, the paraphrase band, recurrence figures and the leakage report.

Scopes (config `dedup.scopes`):
- `image`: rows of one image with the same set of question classes ask the same thing, and among them
  only the plan's own row and its LLM paraphrases (`paraphrase_of`, a column of the QA table) meet. Rows
  are visited in keep order: rows that paraphrase nothing first, then by `qa_id` (the same survivors on
  every run, whatever the row order). A row is
  - a duplicate of the best-matching row kept before it when their normalised questions are equal
    (rule `exact`) or their cosine similarity is at least `paraphrase_max_similarity` (rule `near`): it
    adds nothing;
  - else, for a paraphrase, drifted when its cosine similarity to the row it paraphrases is below
    `threshold` (rule `drifted`, `duplicate_of` = that row): it no longer asks what that row asks, yet
    carries its answer; a paraphrase whose row is not in the table cannot be checked and goes too (`orphan`);
  - else kept. What is kept of the paraphrases is the band between the two bounds: faithful, and worded
    differently enough to add a phrasing.
- `global`: how often phrasings recur across the rows the image scope kept: exact recurrence (the most
  repeated phrasings with their row counts), every pair of distinct phrasings at cosine >=
  `global_threshold` (faiss range search, exact), groups of them with a bounded diameter (greedy leader
  groups: every member is within `global_threshold` of its group's leader, so two members are within the
  angle of twice that), and a histogram of each phrasing's nearest-neighbour similarity; with
  `max_repeats`, a cap on how many rows one phrasing may have (extra rows removed by a seeded, order-free
  choice; rule `cap`; the paraphrases of a capped row go with it, rule `orphan`).
- `cross-split`: test rows that ask what a train row asks (same classes, cosine >= `threshold`) about a
  train image near their own: one of the test image's nearest train images
  (`dedup.frames.nearest_cross_split_pairs`) within `split.leakage_distance` bits. The split already keeps
  near duplicates (<= `split.near_duplicate_distance`, equal bytes included) together, so this looks at
  what it did not use: similar scenes of one patient or procedure on both sides. Reported, not removed.

Nothing is lost: the duplicates table says for every removed row which row it duplicates (or drifted
from), how similar they are, and under which scope and rule. Input rows = kept + duplicates.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import pandas as pd

from kvqa.tables import stable_hash

DUPLICATE_COLUMNS = ["qa_id", "duplicate_of", "similarity", "scope", "rule"]
LEAKAGE_COLUMNS = ["test_qa_id", "train_qa_id", "similarity", "test_img_id", "train_img_id", "image_distance"]
HIST_BINS = np.round(np.linspace(0.0, 1.0, 21), 2)
SEARCH_CHUNK = 2048  # faiss: IndexHNSWFlat.range_search aborts at >= 4,096 queries a call; stay well below
TOP_GROUPS = 5


def is_paraphrase(qa: pd.DataFrame) -> np.ndarray:
    """Rows that paraphrase another row (`paraphrase_of` not empty)."""
    return (qa["paraphrase_of"].fillna("") != "").to_numpy()


def keep_order(qa: pd.DataFrame) -> np.ndarray:
    """Positions in keep order: rows that paraphrase nothing before paraphrases, then by qa_id."""
    return np.lexsort((qa["qa_id"].to_numpy(), is_paraphrase(qa)))


def _removal(qa_id: str, of: str, similarity: float, rule: str) -> dict:
    return {"qa_id": qa_id, "duplicate_of": of, "similarity": similarity if np.isnan(similarity)
            else round(float(similarity), 4), "scope": "image", "rule": rule}


def image_scope_duplicates(qa: pd.DataFrame, texts: list[str], vectors: np.ndarray, threshold: float,
                           max_similarity: float) -> list[dict]:
    """Duplicates and drifted paraphrases among the rows of one image with the same class set (see the
    module docstring): `threshold` is the lower bound of the paraphrase band, `max_similarity` the upper."""
    order = keep_order(qa)
    groups: dict[tuple, list[int]] = defaultdict(list)
    keys = list(zip(qa["source"], qa["img_id"], (tuple(sorted(c)) for c in qa["question_class"])))
    for i in order:
        groups[keys[i]].append(int(i))
    ids = qa["qa_id"].tolist()
    paraphrase_of = qa["paraphrase_of"].fillna("").tolist()
    position = {qa_id: i for i, qa_id in enumerate(ids)}
    out = []
    for members in groups.values():
        kept: list[int] = []
        for i in members:
            exact = next((k for k in kept if texts[k] == texts[i]), None)
            if exact is not None:
                out.append(_removal(ids[i], ids[exact], 1.0, "exact"))
                continue
            if kept:
                sims = vectors[kept] @ vectors[i]
                best = int(np.argmax(sims))
                if sims[best] >= max_similarity:
                    out.append(_removal(ids[i], ids[kept[best]], sims[best], "near"))
                    continue
            if paraphrase_of[i]:
                of = position.get(paraphrase_of[i])
                if of is None:
                    out.append(_removal(ids[i], paraphrase_of[i], float("nan"), "orphan"))
                    continue
                s_of = float(vectors[of] @ vectors[i])
                if s_of < threshold:
                    out.append(_removal(ids[i], paraphrase_of[i], s_of, "drifted"))
                    continue
            kept.append(i)
    return out


def nearest_neighbour_similarity(vectors: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Cosine similarity of each of `rows` to its nearest other row: exact 2-NN by inner product with faiss
    (`IndexFlatIP`), in chunks."""
    import faiss

    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    out = []
    for start in range(0, len(rows), SEARCH_CHUNK):
        part = rows[start:start + SEARCH_CHUNK]
        s, i = index.search(vectors[part], 2)
        out.append(np.where(i[:, 0] == part, s[:, 1], s[:, 0]))
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def near_identical_pairs(vectors: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair (a < b) of rows with cosine >= `threshold`, exactly: faiss `IndexFlatIP` range search in
    chunks. Returns (a, b, similarity), sorted by (a, b)."""
    import faiss

    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    radius = float(np.nextafter(np.float32(threshold), np.float32(-np.inf)))  # faiss keeps similarity > radius
    a_parts, b_parts, s_parts = [], [], []
    for start in range(0, len(vectors), SEARCH_CHUNK):
        lims, sims, idx = index.range_search(vectors[start:start + SEARCH_CHUNK], radius)
        a = np.repeat(np.arange(start, start + len(lims) - 1), np.diff(lims).astype(np.int64))
        keep = (idx > a) & (sims >= threshold)
        a_parts.append(a[keep])
        b_parts.append(idx[keep])
        s_parts.append(sims[keep])
    a, b, s = (np.concatenate(p) if p else np.zeros(0) for p in (a_parts, b_parts, s_parts))
    order = np.lexsort((b, a))
    return a[order].astype(np.int64), b[order].astype(np.int64), s[order].astype(np.float32)


def leader_groups(n: int, a: np.ndarray, b: np.ndarray, visit_order: list[int]) -> list[list[int]]:
    """Greedy groups with a bounded diameter over the pairs (a, b) above a threshold: items are visited in
    `visit_order`; one not yet in a group leads a new group of itself and its neighbours not yet in one.
    Every member is a neighbour of its leader (unlike connected components, which chain neighbours of
    neighbours into one giant group). Members are listed in `visit_order`."""
    rank = np.empty(n, np.int64)
    rank[np.asarray(visit_order, np.int64)] = np.arange(n)
    ends = np.concatenate([a, b])
    others = np.concatenate([b, a])
    by_end = np.lexsort((rank[others], ends))
    ends, others = ends[by_end], others[by_end]
    lims = np.searchsorted(ends, np.arange(n + 1))
    group = np.full(n, -1, np.int64)
    groups: list[list[int]] = []
    for i in visit_order:
        if group[i] >= 0:
            continue
        members = [i] + [int(j) for j in others[lims[i]:lims[i + 1]] if group[j] < 0]
        group[members] = len(groups)
        groups.append(members)
    return groups


def global_recurrence(qa: pd.DataFrame, texts: list[str], vectors: np.ndarray, global_threshold: float,
                      max_repeats: int | None, seed: int) -> tuple[dict, list[dict]]:
    """Recurrence figures of the phrasings across the rows (see the module docstring), and the rows over
    the cap. A phrasing is a distinct normalised question; its rows are the rows that ask it."""
    counts = Counter(texts)
    distinct = list(counts)
    first_row = {}
    for i, t in enumerate(texts):
        first_row.setdefault(t, i)
    figures: dict = {"rows": len(texts), "distinct_phrasings": len(distinct),
                     "rows_with_recurring_phrasing": int(sum(c for c in counts.values() if c > 1)),
                     "most_repeated": [[t, c] for t, c in counts.most_common(TOP_GROUPS)],
                     "near_identical_threshold": global_threshold}
    if len(distinct) > 1:
        dvec = vectors[[first_row[t] for t in distinct]]
        a, b, s = near_identical_pairs(dvec, global_threshold)
        # A phrasing's nearest neighbour is its best pair when it has one; only the others need a search.
        nn = np.full(len(distinct), -np.inf, np.float32)
        np.maximum.at(nn, a, s)
        np.maximum.at(nn, b, s)
        alone = np.flatnonzero(nn == -np.inf)
        nn[alone] = nearest_neighbour_similarity(dvec, alone)
        hist, _ = np.histogram(np.clip(nn, 0, 1), bins=HIST_BINS)
        # Leaders: the most repeated phrasings first (a group is named by what most rows ask), then by text.
        visit = sorted(range(len(distinct)), key=lambda i: (-counts[distinct[i]], distinct[i]))
        groups = [g for g in leader_groups(len(distinct), a, b, visit) if len(g) > 1]

        def describe(g: list[int]) -> dict:
            return {"leader": distinct[g[0]], "phrasings": len(g), "rows": int(sum(counts[distinct[i]] for i in g)),
                    "min_similarity_to_leader": round(float(np.min(dvec[g[1:]] @ dvec[g[0]])), 4),
                    "other_phrasings": [distinct[j] for j in g[1:4]]}

        largest = sorted(groups, key=lambda g: (-sum(counts[distinct[i]] for i in g), distinct[g[0]]))[:TOP_GROUPS]
        figures.update({
            "near_identical_pairs": len(a),
            "phrasings_with_a_near_identical_neighbour": int(len(np.union1d(a, b))),
            "near_identical_groups": len(groups),
            "phrasings_in_near_identical_groups": int(sum(len(g) for g in groups)),
            "largest_near_identical_groups": [describe(g) for g in largest],
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
        # A capped row's paraphrases would point at a row the release lacks: they go too, as in the image
        # scope (`orphan`, duplicate_of = the capped row they paraphrase).
        gone = {c["qa_id"] for c in capped}
        orphans = [{"qa_id": q, "duplicate_of": of, "similarity": float("nan"), "scope": "global",
                    "rule": "orphan"} for q, of in zip(ids, qa["paraphrase_of"].fillna(""))
                   if of in gone and q not in gone]
        figures["orphaned_by_cap"] = len(orphans)
        capped += orphans
    return figures, capped


def cross_split_leakage(qa: pd.DataFrame, vectors: np.ndarray, image_pairs: pd.DataFrame, threshold: float,
                        max_image_distance: int) -> pd.DataFrame:
    """Test rows that repeat a train row's meaning on a train image near their own (module docstring):
    `image_pairs` holds (test_source, test_img_id, train_source, train_img_id, distance) rows (the nearest
    cross-split pairs); those up to `max_image_distance` bits are looked at. One row per leaking test row: its
    most similar train row (ties: the nearer image, then the smaller train qa_id)."""
    rows = qa.reset_index(drop=True).reset_index(names="row_pos")
    rows["classes_key"] = [tuple(sorted(c)) for c in rows["question_class"]]
    train_groups = {k: g["row_pos"].to_numpy() for k, g in rows.groupby(["source", "img_id", "classes_key"])}
    ids = rows["qa_id"].to_numpy()
    near = image_pairs[image_pairs["distance"] <= max_image_distance]
    candidates = rows.merge(near, left_on=["source", "img_id"], right_on=["test_source", "test_img_id"])
    best: dict[str, tuple] = {}
    for r in candidates.itertuples(index=False):
        train = train_groups.get((r.train_source, r.train_img_id, r.classes_key))
        if train is None:
            continue
        sims = vectors[train] @ vectors[r.row_pos]
        top = int(np.argmax(sims))
        if sims[top] < threshold:
            continue
        found = (-round(float(sims[top]), 4), int(r.distance), str(ids[train[top]]), r.img_id, r.train_img_id)
        if r.qa_id not in best or found < best[r.qa_id]:
            best[r.qa_id] = found
    out = []
    for qa_id in rows["qa_id"]:  # table order
        if qa_id in best:
            similarity, distance, train_qa_id, img_id, train_img_id = best[qa_id]
            out.append({"test_qa_id": qa_id, "train_qa_id": train_qa_id, "similarity": -similarity,
                        "test_img_id": img_id, "train_img_id": train_img_id, "image_distance": distance})
    return pd.DataFrame(out, columns=LEAKAGE_COLUMNS)
