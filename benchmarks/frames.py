"""Near-duplicate image search and clustered split at 6,500, 17,000 and 110,000 images (issue 13).

Random 256-bit fingerprints (whole picture + 5 windows per image, hex as in the images table), with 2 % of
the images planted as near copies of another (distance 20-40 bits, to a whole or a window fingerprint).
Reported: `image_clusters` (hex decoding, multi-index search, union-find), and `assign_splits` end to end
at 6,500 (the Kvasir-VQA release); 17,000 is about what a HyperKvasir + Kvasir-VQA release splits (images
with labels), 110,000 all of HyperKvasir;
the multi-index search alone against faiss's `IndexBinaryFlat` (brute force in C) and
`IndexBinaryMultiHash` (the same pigeonhole, 16 tables of 16 bits, 2 flips) on a smaller set, all three
checked to find the same pairs; and the fingerprint's cost per real frame.

    .venv/bin/python benchmarks/frames.py [--quick]
"""

from __future__ import annotations

import argparse
import time

import faiss
import numpy as np
import pandas as pd
from _common import SHARED, peak_rss_mib, print_json, print_table
from PIL import Image

from dedup.frames import WORDS, image_clusters, near_duplicate_pairs
from kvqa.config import DEFAULT_NEAR_DUPLICATE_DISTANCE as R
from publish.split import assign_splits
from sources.images import frame_fingerprints


def random_fingerprints(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    whole = rng.integers(0, 2**64, size=(n, WORDS), dtype=np.uint64)
    windows = rng.integers(0, 2**64, size=(n, 5, WORDS), dtype=np.uint64)
    for i in rng.choice(n - 1, n // 50, replace=False):  # planted near copies of image i
        code = whole[i].copy()
        for bit in rng.choice(256, int(rng.integers(20, R + 1)), replace=False):
            code[bit // 64] ^= np.uint64(1) << np.uint64(bit % 64)
        if rng.random() < 0.5:
            whole[i + 1] = code
        else:
            windows[i + 1, rng.integers(0, 5)] = code
    return whole, windows


def as_images(whole: np.ndarray, windows: np.ndarray) -> pd.DataFrame:
    n = len(whole)
    return pd.DataFrame({"source": "s", "img_id": [f"{i:06d}" for i in range(n)],
                         "source_label": np.where(np.arange(n) % 7 == 0, "a", "b"),
                         "sha256": [f"h{i}" for i in range(n)],
                         "fingerprint": [w.tobytes().hex() for w in whole],
                         "window_fingerprints": [w.tobytes().hex() for w in windows]})


def faiss_pairs(index, whole: np.ndarray, windows: np.ndarray) -> set[tuple[int, int]]:
    n = len(whole)
    entries = np.concatenate([whole, windows.reshape(-1, WORDS)]).view(np.uint8).reshape(-1, 32)
    owner = np.concatenate([np.arange(n), np.repeat(np.arange(n), windows.shape[1])])
    index.add(np.ascontiguousarray(entries))
    lims, _, ids = index.range_search(np.ascontiguousarray(whole.view(np.uint8).reshape(n, 32)), R + 1)
    q = np.repeat(np.arange(n), np.diff(lims).astype(np.int64))
    a, b = q, owner[ids]
    keep = a != b
    return set(zip(np.minimum(a, b)[keep].tolist(), np.maximum(a, b)[keep].tolist()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="6,500 images only, faiss comparison on 2,000")
    args = ap.parse_args()
    sizes = [6_500] if args.quick else [6_500, 17_000, 110_000]
    compare_n = 2_000 if args.quick else 6_500
    rows, figures = [], {"max_distance": R}
    for n in sizes:
        whole, windows = random_fingerprints(n)
        images = as_images(whole, windows)
        t0 = time.perf_counter()
        clusters = image_clusters(images, R)
        clusters_s = time.perf_counter() - t0
        multi = int((clusters.value_counts() > 1).sum())
        rows.append((f"{n:,} images: image_clusters (hex + search + union-find), s", round(clusters_s, 2),
                     f"{multi:,} clusters of 2+"))
        figures[str(n)] = {"image_clusters_s": round(clusters_s, 2), "clusters": multi}
        if n == sizes[0]:
            t0 = time.perf_counter()
            splits = assign_splits(images, 0.1, 42, R)
            split_s = time.perf_counter() - t0
            rows.append((f"{n:,} images: assign_splits end to end, s", round(split_s, 2),
                         f"test {(splits.split == 'test').sum():,}"))
            figures[str(n)]["assign_splits_s"] = round(split_s, 2)
    whole, windows = random_fingerprints(compare_n, seed=1)
    t0 = time.perf_counter()
    ours = near_duplicate_pairs(whole, windows, R)
    ours_s = time.perf_counter() - t0
    ours = set(zip(ours.a.tolist(), ours.b.tolist()))
    t0 = time.perf_counter()
    flat = faiss_pairs(faiss.IndexBinaryFlat(256), whole, windows)
    flat_s = time.perf_counter() - t0
    mh = faiss.IndexBinaryMultiHash(256, 16, 16)
    mh.nflip = 2  # 16 x (2 + 1) = 48 > R: exact by pigeonhole
    t0 = time.perf_counter()
    multihash = faiss_pairs(mh, whole, windows)
    mh_s = time.perf_counter() - t0
    assert ours == flat == multihash, "the three searches disagree"
    rows += [(f"{compare_n:,} images: ours (numpy multi-index hashing), s", round(ours_s, 2), f"{len(ours):,} pairs"),
             (f"{compare_n:,} images: faiss IndexBinaryFlat range search, s", round(flat_s, 2), "same pairs"),
             (f"{compare_n:,} images: faiss IndexBinaryMultiHash(16 x 16 bits, nflip 2), s", round(mh_s, 2),
              "same pairs")]
    figures["compare"] = {"images": compare_n, "ours_s": round(ours_s, 2), "faiss_flat_s": round(flat_s, 2),
                          "faiss_multihash_s": round(mh_s, 2), "pairs": len(ours)}
    frames = sorted((SHARED / "kvasir-seg" / "images").glob("*.jpg"))
    if frames:
        decoded = []
        for p in frames:
            with Image.open(p) as im:
                im.load()
                decoded.append(im.copy())
        frame_fingerprints(decoded[0])  # imports scipy's DCT outside the timing
        t0 = time.perf_counter()
        for im in decoded:
            frame_fingerprints(im)
        per_frame_ms = (time.perf_counter() - t0) / len(decoded) * 1000
        rows.append(("fingerprint of a decoded real frame (617x528 to 1348x1070), ms", round(per_frame_ms, 1)))
        figures["fingerprint_ms_per_frame"] = round(per_frame_ms, 1)
    figures["peak_rss_mib"] = peak_rss_mib()
    rows.append(("peak RSS, MiB", figures["peak_rss_mib"]))
    print_table(f"near-duplicate images (max distance {R} of 256 bits; random fingerprints + 2 % planted copies)",
                rows)
    print_json(figures)


if __name__ == "__main__":
    main()
