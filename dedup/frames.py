"""Near-duplicate images: clusters of one scene's frames, and the pairs a split leaks.

Kvasir and HyperKvasir frames come from videos: consecutive frames and re-encoded, resized or cropped
copies of one scene are common, and a model that saw one in train has seen the test answer. The image stage
(`sources.images`) gives every image a 256-bit perceptual fingerprint of the whole picture and of five crop
windows. Two images are **near duplicates** when their bytes are equal (sha256) or their fingerprint
distance is at most `max_distance` bits, where the distance of A and B is the smallest Hamming distance
between A's whole-picture fingerprint and B's whole or window fingerprints, or the other way round (a copy
cropped by 5-10 % is near one of its original's windows). Clusters are the connected components of that
relation; `publish.split` puts every cluster in one split.

Search. All pairs within `max_distance` are found exactly by multi-index hashing (Norouzi et al., "Fast
exact search in Hamming space with multi-index hashing", TPAMI 2014): the 256 bits are cut into t
substrings of b bits and substring i is allowed f_i flipped bits, with sum(f_i + 1) > max_distance, so by
pigeonhole every pair within the radius agrees with at most f_i flips on some substring. Each substring is a
table of `2**b` buckets (a counting sort); a query looks up its substring with every pattern of up to f_i
flips, and every candidate is verified on all 256 bits (`np.bitwise_count`). Nothing is approximate: the
pairs are those a brute-force comparison finds (a test checks it). The cost is set by the radius: 44 of 256
bits (17 %) needs ~12-15 tables probed with 2-3 flipped bits each, thousands of probes per query, so it
grows a little slower than the number of pairs (measured, random fingerprints, one core: 6,500 images
0.8 s, 17,000 3.6 s, 110,000 116 s). faiss's `IndexBinaryFlat` (brute force in C, both cores) is 2-3x
faster up to ~40,000 images and about as fast at 110,000 (quadratic: ~90 s extrapolated); its
`IndexBinaryMultiHash` does the same pigeonhole as here but 4x slower (a `std::unordered_set` per query).
Figures: `benchmarks/README.md`. A brute-force comparison in Python is never made.

Everything is deterministic whatever the row order: images are sorted by (source, img_id) first, and a
cluster's id is the `source/img_id` of its first member in that order.
"""

from __future__ import annotations

from functools import lru_cache
from itertools import combinations

import numpy as np
import pandas as pd

from kvqa.config import DEFAULT_NEAR_DUPLICATE_DISTANCE

FINGERPRINT_BYTES = 32  # 256 bits, as `sources.images` writes them
WORDS = FINGERPRINT_BYTES // 8
MAX_TABLE_BITS = 20  # a table has 2**b buckets: 1M counters at most
MAX_FLIPS = 3
CANDIDATE_COST = 3  # measured: verifying a candidate takes about three times as long as a probe
CANDIDATE_CHUNK = 2_000_000  # probes made, and candidate pairs verified, at once (bounds memory)
NEAREST_PAIR_COLUMNS = ["test_source", "test_img_id", "train_source", "train_img_id", "rank", "distance", "same_bytes"]
NEAREST_TRAIN_IMAGES = 3  # train images listed per test image (the question-level check reads all of them)


# --- fingerprints ------------------------------------------------------------------------------------------

def fingerprint_words(hex_codes: pd.Series | list[str], per_row: int = 1) -> np.ndarray:
    """Hex fingerprints -> uint64 array (rows, per_row, WORDS); a missing or malformed one -> all zeros
    and flagged by `valid_fingerprints` (it then matches nothing)."""
    out = np.zeros((len(hex_codes), per_row * FINGERPRINT_BYTES), dtype=np.uint8)
    for i, code in enumerate(hex_codes):
        if isinstance(code, str) and len(code) == 2 * per_row * FINGERPRINT_BYTES:
            try:
                out[i] = np.frombuffer(bytes.fromhex(code), dtype=np.uint8)
            except ValueError:
                pass
    return out.view(np.uint64).reshape(len(hex_codes), per_row, WORDS)


def valid_fingerprints(images: pd.DataFrame) -> np.ndarray:
    """Rows whose whole-picture fingerprint is present and well formed."""
    if "fingerprint" not in images.columns:
        return np.zeros(len(images), dtype=bool)
    ok = []
    for code in images["fingerprint"]:
        try:
            ok.append(isinstance(code, str) and len(bytes.fromhex(code)) == FINGERPRINT_BYTES)
        except ValueError:
            ok.append(False)
    return np.asarray(ok, dtype=bool)


def fingerprint_arrays(images: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(whole (n, WORDS), windows (n, k, WORDS), valid (n,)) of an images table's fingerprints; a row is
    valid when both its fingerprints are well formed. None when no row has them."""
    valid = valid_fingerprints(images)
    if not valid.any() or "window_fingerprints" not in images.columns:
        return None
    k = len(next(c for c, ok in zip(images["window_fingerprints"], valid) if ok)) // (2 * FINGERPRINT_BYTES)
    whole = fingerprint_words(images["fingerprint"].to_numpy())[:, 0]
    windows = fingerprint_words(images["window_fingerprints"].to_numpy(), per_row=max(k, 1))
    valid &= np.asarray([isinstance(c, str) and len(c) == 2 * k * FINGERPRINT_BYTES
                         for c in images["window_fingerprints"]])
    return whole, windows, valid


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamming distances of uint64 fingerprints (..., WORDS), broadcast."""
    return np.bitwise_count(np.bitwise_xor(a, b)).sum(axis=-1, dtype=np.int64)


def fingerprint_distance(a: tuple[str, str], b: tuple[str, str]) -> int:
    """The near-duplicate distance (module docstring) of two images given as (fingerprint,
    window_fingerprints) hex pairs: min over A-whole vs B-whole/windows and B-whole vs A-windows."""
    (wa, xa), (wb, xb) = a, b
    whole_a, whole_b = fingerprint_words([wa])[0, 0], fingerprint_words([wb])[0, 0]
    win_a = fingerprint_words([xa], len(xa) // (2 * FINGERPRINT_BYTES))[0]
    win_b = fingerprint_words([xb], len(xb) // (2 * FINGERPRINT_BYTES))[0]
    return int(min(hamming(whole_a, whole_b), hamming(whole_a, win_b).min(), hamming(win_a, whole_b).min()))


# --- multi-index hashing -----------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def _flip_masks(bits: int, flips: int) -> np.ndarray:
    """Every b-bit pattern with at most `flips` ones (the XOR masks a table is probed with; read only)."""
    masks = [0]
    for k in range(1, flips + 1):
        masks += [sum(1 << i for i in c) for c in combinations(range(bits), k)]
    out = np.asarray(masks, dtype=np.uint64)
    out.flags.writeable = False  # cached: shared by every caller
    return out


def table_plan(n_bits: int, max_distance: int, n_entries: int) -> list[tuple[int, int, int]]:
    """(bit offset, width, flips) per table: disjoint substrings with sum(flips + 1) > max_distance, chosen
    to minimise probes + expected candidates (uniform buckets; a candidate, verified on all bits, costs
    about CANDIDATE_COST probes). Exact for any choice; this only sets the speed."""
    need = max_distance + 1
    best, best_cost = None, None
    for width in range(8, MAX_TABLE_BITS + 1):
        n_tables = n_bits // width
        base, extra = divmod(need, n_tables)
        flips = [base - 1 + (i < extra) for i in range(n_tables)]
        flips = [f for f in flips if f >= 0]
        if max(flips) > MAX_FLIPS:
            continue
        probes = sum(len(_flip_masks(width, f)) for f in flips)
        cost = probes * (1.0 + CANDIDATE_COST * n_entries / 2 ** width)
        if best_cost is None or cost < best_cost:
            best, best_cost = [(i * width, width, f) for i, f in enumerate(flips)], cost
    if best is None:
        raise ValueError(f"max_distance {max_distance} is too large for {n_bits}-bit multi-index hashing")
    return best


def _substring(words: np.ndarray, offset: int, width: int) -> np.ndarray:
    """Bits [offset, offset + width) of each uint64 fingerprint (rows, WORDS), as integers."""
    word, shift = divmod(offset, 64)
    value = words[:, word] >> np.uint64(shift)
    if shift + width > 64:
        value |= words[:, word + 1] << np.uint64(64 - shift)
    return value & np.uint64((1 << width) - 1)


def _expand(first: np.ndarray, count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For probes with bucket start `first` and size `count`: (probe index, position) of every candidate."""
    probe = np.repeat(np.arange(len(count)), count)
    within = np.arange(len(probe)) - np.repeat(np.cumsum(count) - count, count)
    return probe, first[probe] + within


def hamming_pairs(queries: np.ndarray, entries: np.ndarray, max_distance: int) -> tuple[np.ndarray, ...]:
    """Every (query row, entry row, distance) with Hamming distance <= max_distance, exactly, by
    multi-index hashing. `queries` (nq, WORDS) and `entries` (ne, WORDS) are uint64 fingerprints. A pair
    may be listed more than once (once per table it is found in)."""
    n_bits = 64 * queries.shape[1]
    # One contiguous array per 64-bit word: 1-D gathers are several times faster than row gathers.
    q_words = [np.ascontiguousarray(queries[:, w]) for w in range(queries.shape[1])]
    e_words = [np.ascontiguousarray(entries[:, w]) for w in range(entries.shape[1])]
    found_q, found_e, found_d = [], [], []
    for offset, width, flips in (table_plan(n_bits, max_distance, len(entries)) if len(entries) else []):
        keys = _substring(entries, offset, width).astype(np.int64)
        order = np.argsort(keys, kind="stable")
        counts = np.bincount(keys, minlength=1 << width)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        counts = counts.astype(np.int32)  # gathered once per probe: half the memory traffic
        qkeys = _substring(queries, offset, width).astype(np.int64)
        masks = _flip_masks(width, flips).astype(np.int64)
        block = max(1, CANDIDATE_CHUNK // len(masks))  # queries probed at once, with all their masks
        for lo in range(0, len(queries), block):
            q_block = qkeys[lo:lo + block]
            probe = (q_block[None, :] ^ masks[:, None]).ravel()  # mask-major: probe i is query lo + i % len
            hit = np.flatnonzero(counts[probe])
            if not len(hit):
                continue
            probe, q_of = probe[hit], lo + hit % len(q_block)
            count, first = counts[probe], starts[probe]
            bounds = np.searchsorted(np.cumsum(count), np.arange(CANDIDATE_CHUNK, int(count.sum()), CANDIDATE_CHUNK))
            for part in np.split(np.arange(len(probe)), bounds):
                which, pos = _expand(first[part], count[part])
                q, e = q_of[part][which], order[pos]
                d = np.zeros(len(q), dtype=np.int64)
                for qw, ew in zip(q_words, e_words):
                    d += np.bitwise_count(qw[q] ^ ew[e])
                near = d <= max_distance
                found_q.append(q[near]), found_e.append(e[near]), found_d.append(d[near])
    if not found_q:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    return np.concatenate(found_q), np.concatenate(found_e), np.concatenate(found_d)


def near_duplicate_pairs(whole: np.ndarray, windows: np.ndarray, max_distance: int,
                         valid: np.ndarray | None = None) -> pd.DataFrame:
    """Pairs (a, b), a < b row positions, whose fingerprint distance (module docstring) is <= max_distance,
    with that distance. `whole` is (n, WORDS), `windows` (n, k, WORDS); rows not `valid` match nothing."""
    n, k = len(whole), windows.shape[1]
    valid = np.ones(n, dtype=bool) if valid is None else valid
    rows = np.flatnonzero(valid)
    # Index: every valid image's whole-picture and window fingerprints; queries: the whole pictures.
    entries = np.concatenate([whole[rows], windows[rows].reshape(-1, WORDS)])
    owner = np.concatenate([rows, np.repeat(rows, k)])
    q, e, d = hamming_pairs(whole[rows], entries, max_distance)
    a, b = rows[q], owner[e]
    keep = a != b
    pairs = pd.DataFrame({"a": np.minimum(a, b)[keep], "b": np.maximum(a, b)[keep], "distance": d[keep]})
    return (pairs.groupby(["a", "b"], as_index=False, sort=True)["distance"].min()
            .astype({"a": np.int64, "b": np.int64, "distance": np.int64}))


def connected_components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Component label of each of n nodes for the edges (a, b): the smallest node of its component.
    Union-find in numpy: hook every larger root under the smaller one, then compress, until stable."""
    parent = np.arange(n)
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    while len(a):
        ra, rb = parent[a], parent[b]
        lo, hi = np.minimum(ra, rb), np.maximum(ra, rb)
        moved = lo != hi
        if not moved.any():
            break
        np.minimum.at(parent, hi[moved], lo[moved])
        while True:
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped
    return parent


# --- clusters and the leakage report -----------------------------------------------------------------------

def _sorted_images(images: pd.DataFrame) -> pd.DataFrame:
    return images.reset_index(drop=True).reset_index(names="_row").sort_values(["source", "img_id"], kind="stable")


def image_pairs(images: pd.DataFrame, max_distance: int = DEFAULT_NEAR_DUPLICATE_DISTANCE) -> pd.DataFrame:
    """Near-duplicate pairs of `images` (one row per image: source, img_id, and sha256 / fingerprint /
    window_fingerprints where known) as positions `a < b` in (source, img_id) order, with their distance
    (0 for equal bytes) and `same_bytes`. Without fingerprints only equal bytes pair."""
    ordered = _sorted_images(images)
    n = len(ordered)
    parts = []
    if "sha256" in ordered.columns:  # every two images with the same bytes
        same = pd.DataFrame({"g": ordered["sha256"].to_numpy(), "i": np.arange(n)}).dropna()
        same = same[same.duplicated("g", keep=False)]
        same = same.merge(same, on="g")
        same = same[same.i_x < same.i_y]
        parts.append(pd.DataFrame({"a": same.i_x.to_numpy(), "b": same.i_y.to_numpy(), "distance": 0}))
    arrays = fingerprint_arrays(ordered)
    if arrays is not None:
        whole, windows, valid = arrays
        parts.append(near_duplicate_pairs(whole, windows, max_distance, valid))
    if not parts:
        return pd.DataFrame({"a": [], "b": [], "distance": [], "same_bytes": []}).astype(
            {"a": np.int64, "b": np.int64, "distance": np.int64, "same_bytes": bool})
    pairs = (pd.concat(parts, ignore_index=True).astype({"a": np.int64, "b": np.int64, "distance": np.int64})
             .groupby(["a", "b"], as_index=False, sort=True)["distance"].min())
    if "sha256" in ordered.columns:
        sha = ordered["sha256"].to_numpy()
        pairs["same_bytes"] = (sha[pairs["a"]] == sha[pairs["b"]]) & pd.notna(sha[pairs["a"]])
    else:
        pairs["same_bytes"] = False
    return pairs


def image_clusters(images: pd.DataFrame, max_distance: int = DEFAULT_NEAR_DUPLICATE_DISTANCE) -> pd.Series:
    """Cluster id per row of `images` (same index): the `source/img_id` of the cluster's first member in
    (source, img_id) order. A cluster is a connected component of the near-duplicate relation (equal bytes
    or fingerprint distance <= max_distance); an image with no near duplicate is a cluster of one."""
    ordered = _sorted_images(images)
    pairs = image_pairs(images, max_distance)
    root = connected_components(len(ordered), pairs["a"].to_numpy(), pairs["b"].to_numpy())
    keys = (ordered["source"].astype(str) + "/" + ordered["img_id"].astype(str)).to_numpy()
    labels = np.empty(len(ordered), dtype=object)
    labels[ordered["_row"].to_numpy()] = keys[root]
    return pd.Series(labels, index=images.index, name="cluster", dtype=object)


def nearest_cross_split_pairs(images: pd.DataFrame, splits: pd.DataFrame,
                              per_test_image: int = NEAREST_TRAIN_IMAGES) -> pd.DataFrame:
    """For every test image, its `per_test_image` nearest train images by the near-duplicate distance
    (NEAREST_PAIR_COLUMNS; rank 1 is the nearest; equal bytes are 0 apart, ties go to the first train image in
    (source, img_id) order). The leakage report is made of what the split did not use: the clustered split
    guarantees every rank-1 distance exceeds `near_duplicate_distance`, and how far beyond it the closest
    scenes of the other split lie is a figure that can move. Exact (every test x train distance, in blocks
    of test images; 0.02 s for the sample's 74 images on an AMD EPYC, full size not yet measured: no
    benchmark covers it). Images without a split, and a test image whose fingerprints are
    missing and whose bytes equal no train image, get no pair."""
    with_split = images.merge(splits[["source", "img_id", "split"]], on=["source", "img_id"], how="inner")
    ordered = _sorted_images(with_split).reset_index(drop=True)
    test, train = ordered[ordered["split"] == "test"], ordered[ordered["split"] == "train"]
    if not len(test) or not len(train):
        return pd.DataFrame(columns=NEAREST_PAIR_COLUMNS)
    far = 64 * WORDS + 1  # no fingerprint: farther than any distance
    arrays = fingerprint_arrays(ordered)
    if arrays is not None:
        whole, windows, valid = arrays
        train_all = np.concatenate([whole[train.index, None], windows[train.index]], axis=1)  # (m, 1 + k, WORDS)
        train_whole, train_valid = whole[train.index], valid[train.index]
    block = max(1, (1 << 26) // (len(train) * (1 + (windows.shape[1] if arrays is not None else 0)) * 8 * WORDS))
    sha = ordered["sha256"].to_numpy() if "sha256" in ordered.columns else None
    out = []
    for lo in range(0, len(test), block):
        rows = test.index[lo:lo + block]
        d = np.full((len(rows), len(train)), far, dtype=np.int64)
        if arrays is not None:
            to_train = hamming(whole[rows, None, None], train_all[None]).min(axis=2)  # test whole vs train's all
            # train whole vs the test image's windows
            from_train = hamming(windows[rows][:, :, None], train_whole[None, None]).min(axis=1)
            ok = valid[rows][:, None] & train_valid[None, :]
            d = np.where(ok, np.minimum(to_train, from_train), d)
        if sha is not None:
            same = (sha[rows][:, None] == sha[train.index][None, :]) & pd.notna(sha[rows])[:, None]
            d[same] = 0
        nearest = np.argsort(d, axis=1, kind="stable")[:, :per_test_image]
        for i, row in enumerate(rows):
            for rank, j in enumerate(nearest[i], start=1):
                if d[i, j] < far:
                    t = train.iloc[j]
                    out.append((ordered.at[row, "source"], ordered.at[row, "img_id"], t["source"], t["img_id"], rank,
                                int(d[i, j]), bool(sha is not None and d[i, j] == 0 and sha[row] == t["sha256"])))
    return pd.DataFrame(out, columns=NEAREST_PAIR_COLUMNS).astype({"rank": np.int64, "distance": np.int64})


def nearest_distance_figures(pairs: pd.DataFrame, near_duplicate_distance: int, leakage_distance: int) -> dict:
    """Figures of the image-level leakage report from `nearest_cross_split_pairs`: per test image the distance
    to its nearest train image, as a histogram in 8-bit bins, its minimum, and the test images within
    `leakage_distance` (similar scenes the split kept apart: the question-level check looks at them)."""
    nearest = pairs.loc[pairs["rank"] == 1, "distance"]
    bins = (nearest // 8 * 8).value_counts().sort_index()
    return {"near_duplicate_distance": near_duplicate_distance, "leakage_distance": leakage_distance,
            "test_images_paired": int(len(nearest)),
            "closest_cross_split_distance": int(nearest.min()) if len(nearest) else None,
            "nearest_train_distance_histogram": {f"{int(lo)}-{int(lo) + 7}": int(n) for lo, n in bins.items()},
            "test_images_near_train": int((nearest <= leakage_distance).sum())}


def cluster_figures(splits: pd.DataFrame) -> dict:
    """Figures for the run report and the card from a splits table with its `cluster` column: clusters of
    more than one image, images in them, the largest cluster and a histogram of cluster sizes."""
    sizes = splits.groupby("cluster").size() if "cluster" in splits.columns and len(splits) else pd.Series(dtype=int)
    multi = sizes[sizes > 1]
    return {"clusters": int(len(multi)), "images_in_clusters": int(multi.sum()),
            "largest_cluster": int(sizes.max()) if len(sizes) else 0,
            "cluster_sizes": {str(k): int(v) for k, v in multi.value_counts().sort_index().items()}}
