"""Split by image, stratified by source and source category, seeded.

All rows of an image land in one split (no image leaks between train and test). Within each stratum
(source, source_label) images are ordered by a hash of (seed, source, img_id) and the first
round(test_fraction * n) go to test, so an image's split depends on the seed and its stratum only --
never on file order. One picture under several ids (a Kvasir-SEG frame is also a HyperKvasir polyp image)
would leak between splits, so images with the same content (`sha256`, when given) all take the split of
the first of them in (source, img_id) order.

Splits table (`stages/splits.parquet`): source, img_id, source_label, split.
"""

from __future__ import annotations

import pandas as pd

from kvqa.tables import stable_hash

SPLIT_COLUMNS = ["source", "img_id", "source_label", "split"]


def usable_images(qa: pd.DataFrame, images: pd.DataFrame) -> pd.DataFrame:
    """One row per image that has QA rows and a usable file: source, img_id, source_label, sha256 (the
    input of `assign_splits`). An image without rows or without a usable file has nothing to split."""
    return (qa[["source", "img_id", "source_label"]].drop_duplicates()
            .merge(images[["source", "img_id", "sha256"]], on=["source", "img_id"]))


def assign_splits(images: pd.DataFrame, test_fraction: float, seed: int) -> pd.DataFrame:
    """`images` has one row per usable image with columns source, img_id, source_label (and sha256)."""
    parts = []
    for _, group in images.groupby(["source", "source_label"], sort=True):
        order = group.assign(_h=[stable_hash(seed, "split", s, i) for s, i in zip(group.source, group.img_id)])
        order = order.sort_values("_h", kind="stable").drop(columns="_h")
        n_test = round(test_fraction * len(order))
        order["split"] = ["test"] * n_test + ["train"] * (len(order) - n_test)
        parts.append(order)
    if not parts:
        return pd.DataFrame(columns=SPLIT_COLUMNS)
    out = pd.concat(parts, ignore_index=True).sort_values(["source", "img_id"], kind="stable")
    if "sha256" in out.columns:
        out["split"] = out.groupby("sha256", sort=False)["split"].transform("first")
    return out[SPLIT_COLUMNS].reset_index(drop=True)
