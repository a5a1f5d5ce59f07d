"""Split by image cluster, stratified by source and source category, seeded.

All rows of an image land in one split, and so do all images of one **cluster**: near duplicates (frames
of one video scene, re-encoded, resized, cropped or slightly rotated copies, one picture under two ids --
a Kvasir-SEG frame is also a HyperKvasir polyp image) found by `dedup.frames.image_clusters` from the
image stage's fingerprints and sha256. A model that saw one of them in train has seen the test answer.

Algorithm (deterministic from the seed and the images' keys, never from row order):
1. Clusters: connected components of "same bytes or fingerprint distance <= max_distance"; a cluster's id
   is its first member's `source/img_id`.
2. A cluster's stratum is the most common (source, source_label) among its members (ties: the first in
   sort order), so each cluster is counted in exactly one stratum.
3. Within a stratum of n images, the target is T = round(test_fraction * n) test images. Clusters are
   walked in the order of stable_hash(seed, "split", source, img_id) of their first member, and a cluster
   goes to test when that brings the stratum's test count strictly closer to T, else to train. Every cluster
   moves whole, so a stratum's test count can miss T by less than its largest cluster; a cluster holding
   images of another stratum takes them along. With no near duplicates (every cluster one image) this is
   exactly the first T images in hash order, the split of earlier versions.

Splits table (`stages/splits.parquet`): source, img_id, source_label, split, cluster.
"""

from __future__ import annotations

import pandas as pd

from dedup.frames import image_clusters
from kvqa.config import DEFAULT_NEAR_DUPLICATE_DISTANCE
from kvqa.tables import stable_hash

SPLIT_COLUMNS = ["source", "img_id", "source_label", "split", "cluster"]
FINGERPRINT_COLUMNS = ["sha256", "fingerprint", "window_fingerprints"]


def usable_images(qa: pd.DataFrame, images: pd.DataFrame) -> pd.DataFrame:
    """One row per image that has QA rows and a usable file: source, img_id, source_label, and sha256 and
    the fingerprints where the images table has them (the input of `assign_splits`). An image without rows
    or without a usable file has nothing to split."""
    keep = ["source", "img_id", *[c for c in FINGERPRINT_COLUMNS if c in images.columns]]
    return (qa[["source", "img_id", "source_label"]].drop_duplicates()
            .merge(images[keep], on=["source", "img_id"]))


def assign_splits(images: pd.DataFrame, test_fraction: float, seed: int,
                  max_distance: int = DEFAULT_NEAR_DUPLICATE_DISTANCE) -> pd.DataFrame:
    """`images` has one row per usable image with columns source, img_id, source_label (and sha256,
    fingerprint, window_fingerprints: without them only the other columns group images). Returns the
    splits table (module docstring)."""
    if not len(images):
        return pd.DataFrame(columns=SPLIT_COLUMNS)
    images = images.drop(columns=[c for c in ("split", "cluster") if c in images.columns])
    images = images.sort_values(["source", "img_id"], kind="stable", ignore_index=True)
    images["cluster"] = image_clusters(images, max_distance)
    # A cluster's stratum: the most common (source, source_label) of its members, ties in sort order.
    strata = (images.groupby(["cluster", "source", "source_label"], sort=True).size().rename("n").reset_index()
              .sort_values(["cluster", "n"], ascending=[True, False], kind="stable")
              .drop_duplicates("cluster"))
    clusters = images.groupby("cluster", sort=True).agg(size=("img_id", "size"), first_source=("source", "first"),
                                                       first_id=("img_id", "first"))
    clusters = clusters.join(strata.set_index("cluster")[["source", "source_label"]])
    clusters["order"] = [stable_hash(seed, "split", s, i) for s, i in zip(clusters.first_source, clusters.first_id)]
    test = set()
    for _, group in clusters.groupby(["source", "source_label"], sort=True):
        target = round(test_fraction * int(group["size"].sum()))
        n_test = 0
        for cluster, size in group.sort_values("order", kind="stable")["size"].items():
            if abs(n_test + size - target) < abs(n_test - target):
                test.add(cluster)
                n_test += size
    images["split"] = ["test" if c in test else "train" for c in images["cluster"]]
    return images[SPLIT_COLUMNS].reset_index(drop=True)
