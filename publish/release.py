"""Write the Hub-ready release folder: `data/{split}-NNNNN-of-NNNNN.parquet` + `README.md`.

Two configs: `default` (`data/`, the QA pairs on the original images) and `augmented` (`augmented/`, the
same pairs on each augmented variant of their image, with the `variant` and `artifact` columns), loadable
as `load_dataset(folder)` and `load_dataset(folder, "augmented")`.

`datasets` does not embed image files by itself when given paths, so the writer puts each image's bytes
into the `image` struct ({bytes, path}) and stores the `datasets` features in the parquet schema metadata;
`load_dataset(folder)` then decodes the column as images, offline. Rows are streamed shard by shard in row
groups, reading each image once per split (rows are grouped by image), so memory stays bounded by one row
group whatever the release size.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Features, Image, List, Value
from tqdm.auto import tqdm

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
# Augmented variants are cropped, rotated and shifted: boxes in the original's pixels would not fit them.
AUGMENTED_FEATURES = Features({**{k: v for k, v in RELEASE_FEATURES.items() if k != "boxes"},
                               "variant": Value("int32"), "artifact": Value("string")})
SPLITS = ("train", "test")


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


def augmented_rows(rows: pd.DataFrame, augmentations: pd.DataFrame, run_dir: Path) -> pd.DataFrame:
    """Every release row once per augmented variant of its image, grouped by image file."""
    aug = augmentations[["source", "img_id", "variant", "artifact", "output_path", "n_bytes"]]
    out = rows.drop(columns=["path", "n_bytes", "image_name"]).merge(aug, on=["source", "img_id"], how="inner")
    out["path"] = [str(Path(run_dir) / p) for p in out.pop("output_path")]
    out["image_name"] = out["img_id"] + "-" + out["path"].map(lambda p: Path(p).name)
    return out.sort_values(["split", "source", "img_id", "variant", "complexity", "qa_id"], kind="stable")


def plan_shards(rows: pd.DataFrame, max_shard_bytes: int) -> list[pd.DataFrame]:
    """Cut a split's rows into shards of at most ~max_shard_bytes (image bytes + text), in order."""
    size = rows["n_bytes"].to_numpy() + rows["question"].str.len().to_numpy() + rows["answer"].str.len().to_numpy()
    shards, start, acc = [], 0, 0
    for i, s in enumerate(size):
        if acc and acc + s > max_shard_bytes:
            shards.append(rows.iloc[start:i])
            start, acc = i, 0
        acc += int(s)
    shards.append(rows.iloc[start:])
    return shards


def column_codecs(schema: pa.Schema) -> dict[str, str]:
    """zstd for every leaf column except the image bytes: JPEG/PNG do not compress, zstd only costs CPU."""
    paths = []
    for f in schema:
        if pa.types.is_struct(f.type):
            paths += [f"{f.name}.{child.name}" for child in f.type]
        elif pa.types.is_list(f.type):
            paths.append(f"{f.name}.list.element")
        else:
            paths.append(f.name)
    return {p: ("NONE" if p == "image.bytes" else "ZSTD") for p in paths}


def _write_shard(rows: pd.DataFrame, path: Path, features: Features, row_group_rows: int, bar: tqdm) -> None:
    schema = features.arrow_schema
    columns = list(features)
    last_path, last_bytes = None, b""
    with atomic_path(path) as tmp:
        with pq.ParquetWriter(tmp, schema, compression=column_codecs(schema),
                              use_dictionary=["img_id", "source", "source_label", "generator",
                                              "generator_version"]) as w:
            for start in range(0, len(rows), row_group_rows):
                chunk = rows.iloc[start:start + row_group_rows]
                images = []
                for p, name in zip(chunk["path"], chunk["image_name"]):
                    if p != last_path:
                        last_path, last_bytes = p, Path(p).read_bytes()
                    images.append({"bytes": last_bytes, "path": name})
                cols = {c: chunk[c].tolist() for c in columns if c not in ("image", "boxes")}
                cols["image"] = images
                if "boxes" in columns:
                    cols["boxes"] = [plain_boxes(boxes) for boxes in chunk["boxes"]]
                w.write_table(pa.Table.from_pydict({c: cols[c] for c in columns}, schema=schema))
                bar.update(len(chunk))


def write_config_shards(rows: pd.DataFrame, out_dir: Path, folder: str, features: Features,
                        config: PublishConfig) -> dict:
    """Write one config's rows as `out_dir/folder/{split}-NNNNN-of-NNNNN.parquet`; return
    {split: [{file, rows, sha256}]}.

    Shards of a previous, different layout are removed so the folder always holds exactly one release.
    """
    data_dir = Path(out_dir) / folder
    data_dir.mkdir(parents=True, exist_ok=True)
    planned: dict[str, list[pd.DataFrame]] = {
        split: plan_shards(part, config.max_shard_bytes)
        for split, part in rows.groupby("split", sort=False) if split in SPLITS
    }
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
                _write_shard(shard, data_dir / name, features, config.row_group_rows, bar)
                written.setdefault(split, []).append(
                    {"file": f"{folder}/{name}", "rows": len(shard), "sha256": file_digest(data_dir / name)})
    return written


def write_release(qa: pd.DataFrame, splits: pd.DataFrame, images: pd.DataFrame, out_dir: Path,
                  config: PublishConfig) -> dict:
    """The `default` config: every usable QA row with its original image embedded."""
    return write_config_shards(release_rows(qa, splits, images), out_dir, "data", RELEASE_FEATURES, config)


def write_augmented_release(qa: pd.DataFrame, splits: pd.DataFrame, images: pd.DataFrame,
                            augmentations: pd.DataFrame, run_dir: Path, out_dir: Path, config: PublishConfig) -> dict:
    """The `augmented` config: every usable QA row once per augmented variant of its image ({} when the
    track was not made)."""
    if not len(augmentations):
        return {}
    rows = augmented_rows(release_rows(qa, splits, images), augmentations, run_dir)
    return write_config_shards(rows, out_dir, "augmented", AUGMENTED_FEATURES, config)
