"""Write the Hub-ready release folder: `data/{split}-NNNNN-of-NNNNN.parquet` + `README.md`.

Two configs: `default` (`data/`, the QA pairs on the original images) and `augmented` (`augmented/`, the
same pairs on each augmented variant of their image, with the `variant` and `artifact` columns), loadable
as `load_dataset(folder)` and `load_dataset(folder, "augmented")`; and, when the explain stage ran, a third,
`explanations` (`explanations/`, `write_explanation_release`): the default config's explained rows with their
explanation, source boxes in Medico subtask 2's shape and Kvasir-SEG mask.

`datasets` does not embed image files by itself when given paths, so the writer puts each image's bytes
into the `image` struct ({bytes, path}) and stores the `datasets` features in the parquet schema metadata;
`load_dataset(folder)` then decodes the column as images, offline.

Each image's bytes are stored once, not once per row (an image has ~24 rows, ×10 variants in `augmented`):
rows are grouped by image file, row groups hold whole images, and the `image.bytes` column is
dictionary-encoded, so a row group stores one dictionary page of its distinct images and, per row, an index
into it. Readers decode it back to plain bytes per row (pyarrow, `datasets`, streaming included), so the
rows, columns and features are what they were. Rows are streamed shard by shard, one row group at a time,
reading each image once per row group, so memory stays bounded by one row group whatever the release size.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Features, Image, List, Value
from tqdm.auto import tqdm

from augment.frames import changed_on_variant, parse_boxes
from kvqa.catalog import Catalog
from kvqa.config import PublishConfig
from kvqa.tables import atomic_path, file_digest, plain_boxes, quarantine_frame

RELEASE_COLUMNS = ["img_id", "complexity", "question", "answer", "original", "question_class", "image",
                   "qa_id", "source", "source_label", "generator", "generator_version", "prompt_hash", "boxes"]
BOX_FEATURE = {"label": Value("string"), "xmin": Value("int32"), "ymin": Value("int32"), "xmax": Value("int32"),
               "ymax": Value("int32")}
RELEASE_FEATURES = Features({
    "img_id": Value("string"),
    "complexity": Value("int32"),
    "question": Value("string"),
    "answer": Value("string"),
    "original": Value("string"),
    "question_class": List(Value("string")),
    "image": Image(),
    "qa_id": Value("string"),
    "source": Value("string"),
    "source_label": Value("string"),
    "generator": Value("string"),
    "generator_version": Value("string"),
    "prompt_hash": Value("string"),
    "boxes": List(BOX_FEATURE),
})
# Augmented rows carry the variant's boxes: the original's moved with the variant's pixels (augment/frames.py).
AUGMENTED_FEATURES = Features({**RELEASE_FEATURES, "variant": Value("int32"), "artifact": Value("string")})
# The `explanations` config (Medico 2026 subtask 2): the default config's rows that have a grounded
# explanation (explain/), with the explanation, the source boxes in the subtask-2 shape and the Kvasir-SEG mask.
VISUAL_FEATURE = {"type": Value("string"), "data": List(List(Value("int32"))), "description": Value("string")}
EXPLANATION_FEATURES = Features({
    **RELEASE_FEATURES,
    "explanation": Value("string"),
    "cited_classes": List(Value("string")),
    "visual_explanation": List(VISUAL_FEATURE),
    "segmentation_mask": Image(),
    "explainer": Value("string"),
    "explainer_version": Value("string"),
    "explanation_prompt_hash": Value("string"),
})
SPLITS = ("train", "test")
# Cap on a row group's distinct image bytes (its image dictionary page, read whole by every reader of the row
# group): ~600 Kvasir images of ~100 kB, far above the ~40 images of a 1,000-row group at ~24 rows per image.
ROW_GROUP_IMAGE_BYTES = 64 * 1024 * 1024
DICTIONARY_ENTRY_PREFIX = 4  # Arrow sizes a BYTE_ARRAY dictionary as the sum of (length prefix + value)
DICTIONARY_COLUMNS = ["image.bytes", "image.path", "img_id", "source", "source_label", "generator",
                      "generator_version"]


def release_rows(qa: pd.DataFrame, splits: pd.DataFrame, images: pd.DataFrame) -> pd.DataFrame:
    """QA rows of usable images with their split and image file, in the release's row order."""
    rows = qa.merge(splits[["source", "img_id", "split"]], on=["source", "img_id"], how="inner")
    rows = rows.merge(images[["source", "img_id", "path", "n_bytes"]], on=["source", "img_id"], how="inner")
    rows["image_name"] = rows["img_id"] + rows["path"].map(lambda p: Path(p).suffix.lower())
    return rows.sort_values(["split", "source", "img_id", "complexity", "qa_id"], kind="stable")


def unreleased_rows(qa: pd.DataFrame, released_ids: pd.Series, bad_images: pd.DataFrame) -> pd.DataFrame:
    """Quarantine rows (`publish/image_quarantined`) for the QA rows that are not in the release because
    their image was quarantined, each naming the image and the image stage's reason."""
    reasons = dict(zip(zip(bad_images["source"], bad_images["key"]), bad_images["reason"]))
    dropped = qa[~qa["qa_id"].isin(released_ids)]
    return quarantine_frame([
        {"stage": "publish", "source": r.source, "key": r.qa_id, "reason": "image_quarantined",
         "detail": f"image {r.img_id}: {reasons.get((r.source, r.img_id), '?')}", "raw": ""}
        for r in dropped.itertuples(index=False)])


def release_row_digests(release_dir: Path) -> dict[str, str]:
    """qa_id -> sha256 of the whole row of the `default` config (image bytes included) and of its split:
    what "a release row is unchanged" means when a class is added to a built run. The split is not a
    column, so it is taken from the shard's name: a row that moves from test to train has changed."""
    out = {}
    for shard in sorted((Path(release_dir) / "data").glob("*.parquet")):
        for batch in pq.ParquetFile(shard).iter_batches(batch_size=1000):
            for row in batch.to_pylist():
                image = row.pop("image")
                row["image"] = [image["path"], hashlib.sha256(image["bytes"]).hexdigest()]
                row["split"] = shard.name.split("-", 1)[0]
                out[row["qa_id"]] = hashlib.sha256(json.dumps(row, sort_keys=True).encode()).hexdigest()
    return out


@dataclass(frozen=True)
class AugmentedRows:
    """The `augmented` config's rows, and the (row, variant) pairs left out of it: on those variants a
    box-derived answer of the row has another value (columns qa_id, variant, question_class)."""
    rows: pd.DataFrame
    left_out: pd.DataFrame


def augmented_rows(rows: pd.DataFrame, augmentations: pd.DataFrame, facts: pd.DataFrame, catalog: Catalog,
                   run_dir: Path) -> AugmentedRows:
    """Every release row once per augmented variant of its image on which it stays true, with the
    variant's boxes (the row's box labels), grouped by image file.

    A row whose facts are all frame-independent, or whose image was rendered photometric only, stays true on
    every variant; a row with a box-derived fact is kept on a variant only when the fact's value recomputed
    from the variant's boxes is the row's (`augment.frames.changed_on_variant`).
    """
    aug = augmentations[["source", "img_id", "variant", "artifact", "output_path", "n_bytes", "width", "height",
                         "geometry", "boxes"]].rename(columns={"boxes": "variant_boxes"})
    out = rows.drop(columns=["path", "n_bytes", "image_name"]).merge(aug, on=["source", "img_id"], how="inner")
    box_facts = facts[facts["box_label"] != ""]
    by_key = {(f["source"], f["img_id"], f["question_class"]): f
              for f in box_facts[["source", "img_id", "question_class", "values", "box_label"]].to_dict("records")}
    keep, boxes, left_out = [], [], []
    for r in out[["qa_id", "source", "img_id", "question_class", "boxes", "variant", "width", "height",
                  "variant_boxes"]].itertuples(index=False):
        row_facts = [by_key[k] for k in ((r.source, r.img_id, c) for c in r.question_class) if k in by_key]
        if not row_facts:  # nothing in the row follows from boxes: true on every variant, no boxes to move
            keep.append(True)
            boxes.append([])
            continue
        moved = parse_boxes(r.variant_boxes)
        changed = changed_on_variant(catalog, row_facts, moved, int(r.width), int(r.height))
        left_out += [{"qa_id": r.qa_id, "variant": int(r.variant), "question_class": c} for c in changed]
        keep.append(not changed)
        labels = {b["label"] for b in plain_boxes(r.boxes)}
        boxes.append([b for b in moved if b["label"] in labels])
    out = out.assign(boxes=boxes)[keep].drop(columns=["variant_boxes", "width", "height"])
    out["path"] = [str(Path(run_dir) / p) for p in out.pop("output_path")]
    out["image_name"] = out["img_id"] + "-" + out["path"].map(lambda p: Path(p).name)
    return AugmentedRows(out.sort_values(["split", "source", "img_id", "variant", "complexity", "qa_id"], kind="stable"),
                         pd.DataFrame(left_out, columns=["qa_id", "variant", "question_class"]))


@dataclass(frozen=True)
class RowGroupPlan:
    """Rows [start, end) of a split's rows (positions), written as one parquet row group."""
    start: int
    end: int
    image_bytes: int  # its distinct images, as its image dictionary page holds them (each with a length prefix)
    text_bytes: int   # its question + answer characters: the shard size estimate's text part


def plan_row_groups(rows: pd.DataFrame, row_group_rows: int,
                    image_bytes_cap: int = ROW_GROUP_IMAGE_BYTES) -> list[RowGroupPlan]:
    """Cut a split's rows (grouped by image file) into row groups of whole images, each of at most
    `row_group_rows` rows and `image_bytes_cap` distinct image bytes.

    Whole images, so an image's bytes are in one dictionary page, not in one per row group it straddles. The
    byte cap bounds the dictionary page, which every reader of the row group reads whole, and which the
    writer's dictionary limit must exceed (past it, Arrow writes the rest of the column chunk PLAIN: every
    row's bytes again). An image with more rows than a row group fills row groups of its own, stored once in
    each; an image larger than the cap is a row group's only image.
    """
    paths = rows["path"].to_numpy()
    starts = np.flatnonzero(np.r_[True, paths[1:] != paths[:-1]]) if len(paths) else np.array([], dtype=int)
    ends = np.r_[starts[1:], len(paths)]
    costs = rows["n_bytes"].to_numpy()[starts] + DICTIONARY_ENTRY_PREFIX
    text = np.r_[0, np.cumsum(rows["question"].str.len().to_numpy() + rows["answer"].str.len().to_numpy())]
    bounds: list[tuple[int, int, int]] = []
    group_start, group_bytes = 0, 0
    for start, end, cost in zip(starts.tolist(), ends.tolist(), costs.tolist()):
        if start > group_start and (end - group_start > row_group_rows or group_bytes + cost > image_bytes_cap):
            bounds.append((group_start, start, group_bytes))
            group_start, group_bytes = start, 0
        while end - group_start > row_group_rows:  # one image with more rows than a row group
            bounds.append((group_start, group_start + row_group_rows, cost))
            group_start += row_group_rows
        group_bytes += cost
    if len(paths):
        bounds.append((group_start, len(paths), group_bytes))
    return [RowGroupPlan(s, e, b, int(text[e] - text[s])) for s, e, b in bounds]


def plan_shards(groups: list[RowGroupPlan], max_shard_bytes: int) -> list[list[RowGroupPlan]]:
    """Pack a split's row groups, in order, into shards of at most ~max_shard_bytes (each row group's
    distinct image bytes + its text; one row group over the cap is a shard of its own)."""
    shards: list[list[RowGroupPlan]] = []
    current: list[RowGroupPlan] = []
    acc = 0
    for group in groups:
        size = group.image_bytes + group.text_bytes
        if current and acc + size > max_shard_bytes:
            shards.append(current)
            current, acc = [], 0
        current.append(group)
        acc += size
    return [*shards, current] if current else shards


def leaf_columns(schema: pa.Schema) -> list[str]:
    """Parquet leaf column paths of a schema (`image.bytes`, `question_class.list.element`, ...)."""
    paths = []
    for f in schema:
        if pa.types.is_struct(f.type):
            paths += [f"{f.name}.{child.name}" for child in f.type]
        elif pa.types.is_list(f.type):
            paths.append(f"{f.name}.list.element")
        else:
            paths.append(f.name)
    return paths


def column_codecs(schema: pa.Schema) -> dict[str, str]:
    """zstd for every leaf column except the image bytes: JPEG/PNG do not compress, zstd only costs CPU."""
    return {p: ("NONE" if p == "image.bytes" else "ZSTD") for p in leaf_columns(schema)}


def _image_column(chunk: pd.DataFrame, image_type: pa.StructType) -> pa.StructArray:
    """The `image` struct of a row group's rows, each distinct file read once (its rows are consecutive)."""
    paths = chunk["path"].to_numpy()
    first = np.r_[True, paths[1:] != paths[:-1]]
    distinct = pa.array([Path(p).read_bytes() for p in paths[first]], pa.binary())
    return pa.StructArray.from_arrays([distinct.take(pa.array(np.cumsum(first) - 1)),
                                       pa.array(chunk["image_name"].tolist(), pa.string())], fields=list(image_type))


def _write_shard(rows: pd.DataFrame, groups: list[RowGroupPlan], path: Path, features: Features, bar: tqdm) -> None:
    schema = features.arrow_schema
    columns = list(features)
    # Arrow checks a dictionary's size after each batch of 1,024 values and, once it is >= the limit, writes the
    # rest of the column chunk PLAIN; so the limit is set above every planned row group's distinct images
    # (never below Arrow's 1 MiB default, which the other dictionary columns keep).
    dictionary_limit = max(1 << 20, max(g.image_bytes for g in groups) + 1)
    with atomic_path(path) as tmp:
        # No min/max statistics on the image bytes: Arrow keeps values up to 4 kB whole there, which would
        # store a small image again in the footer and in page headers, for no query anyone makes.
        with pq.ParquetWriter(tmp, schema, compression=column_codecs(schema),
                              use_dictionary=DICTIONARY_COLUMNS, dictionary_pagesize_limit=dictionary_limit,
                              write_statistics=[p for p in leaf_columns(schema) if p != "image.bytes"]) as w:
            for group in groups:
                chunk = rows.iloc[group.start:group.end]
                cols = {c: chunk[c].tolist() for c in columns if c not in ("image", "boxes")}
                cols["image"] = _image_column(chunk, schema.field("image").type)
                if "boxes" in columns:
                    cols["boxes"] = [plain_boxes(boxes) for boxes in chunk["boxes"]]
                w.write_table(pa.Table.from_pydict({c: cols[c] for c in columns}, schema=schema))
                bar.update(len(chunk))


def write_config_shards(rows: pd.DataFrame, out_dir: Path, folder: str, features: Features,
                        config: PublishConfig, image_bytes_cap: int = ROW_GROUP_IMAGE_BYTES) -> dict:
    """Write one config's rows as `out_dir/folder/{split}-NNNNN-of-NNNNN.parquet`; return
    {split: [{file, rows, sha256}]}.

    Shards of a previous, different layout are removed so the folder always holds exactly one release.
    """
    data_dir = Path(out_dir) / folder
    data_dir.mkdir(parents=True, exist_ok=True)
    parts = {split: part for split, part in rows.groupby("split", sort=False) if split in SPLITS}
    planned = {split: plan_shards(plan_row_groups(part, config.row_group_rows, image_bytes_cap),
                                  config.max_shard_bytes) for split, part in parts.items()}
    names = {split: [f"{split}-{i:05d}-of-{len(shards):05d}.parquet" for i in range(len(shards))]
             for split, shards in planned.items()}
    keep = {n for ns in names.values() for n in ns}
    for stale in data_dir.glob("*.parquet"):
        if stale.name not in keep:
            stale.unlink()
    written: dict[str, list[dict]] = {}
    with tqdm(total=len(rows), desc=f"write {folder}", unit="row", mininterval=1.0,
              disable=len(rows) < 5000) as bar:
        for split in SPLITS:
            for shard, name in zip(planned.get(split, []), names.get(split, [])):
                _write_shard(parts[split], shard, data_dir / name, features, bar)
                written.setdefault(split, []).append({"file": f"{folder}/{name}",
                                                      "rows": shard[-1].end - shard[0].start,
                                                      "sha256": file_digest(data_dir / name)})
    return written


def write_release(qa: pd.DataFrame, splits: pd.DataFrame, images: pd.DataFrame, out_dir: Path,
                  config: PublishConfig) -> dict:
    """The `default` config: every usable QA row with its original image embedded."""
    return write_config_shards(release_rows(qa, splits, images), out_dir, "data", RELEASE_FEATURES, config)


def write_augmented_release(rows: AugmentedRows, out_dir: Path, config: PublishConfig) -> dict:
    """The `augmented` config: every usable QA row once per augmented variant of its image on which it stays
    true (`augmented_rows`)."""
    return write_config_shards(rows.rows, out_dir, "augmented", AUGMENTED_FEATURES, config)


def plain_visual(entries) -> list[dict]:
    """visual_explanation entries as plain Python (parquet hands back numpy arrays of arrays)."""
    return [{"type": str(e["type"]), "data": [[int(x) for x in box] for box in e["data"]],
             "description": str(e["description"])} for e in entries]


def write_explanation_release(qa: pd.DataFrame, splits: pd.DataFrame, images: pd.DataFrame,
                              explanations: pd.DataFrame, out_dir: Path, config: PublishConfig) -> dict:
    """The `explanations` config: every released row that has an explanation, with its image embedded, its
    explanation columns and its Kvasir-SEG mask file's bytes ({} when nothing was explained)."""
    if not len(explanations):
        return {}
    extra = explanations.drop(columns=["source", "img_id"])
    rows = release_rows(qa, splits, images).merge(extra, on="qa_id", how="inner")
    rows["visual_explanation"] = [plain_visual(v) for v in rows["visual_explanation"]]
    masks = {p: Path(p).read_bytes() for p in set(rows["segmentation_mask"]) if p}
    rows["segmentation_mask"] = [{"bytes": masks[p], "path": f"{i}-mask{Path(p).suffix.lower()}"} if p else None
                                 for p, i in zip(rows["segmentation_mask"], rows["img_id"])]
    return write_config_shards(rows, out_dir, "explanations", EXPLANATION_FEATURES, config)
