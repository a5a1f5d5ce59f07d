"""The publish stages: images -> splits -> the release's parquet configs, its card and the ms-swift export."""

from __future__ import annotations

import shutil
from pathlib import Path

from augment import load_artifact_catalog
from augment.stages import RENDER_LIBRARIES
from kvqa.catalog import load_catalog
from kvqa.reconcile import QUARANTINE_FILES, by_reason, reconcile_ids, run_quarantine
from kvqa.stage import Stage, StageRun
from kvqa.tables import write_table, write_text
from publish.card import render_card
from publish.release import (augmented_rows, release_rows, unreleased_rows, write_augmented_release,
                             write_explanation_release, write_release)
from publish.split import assign_splits, usable_images
from publish.swift import write_swift_jsonl
from review import VERDICTS_FILE, error_rates, expert_rejected, load_verdicts

SHARD_SETTINGS = ("publish.max_shard_bytes", "publish.row_group_rows")
SHARD_LIBRARIES = ("datasets", "pillow")  # the shards' features and embedded image bytes


def splits(run: StageRun) -> tuple[dict, list[str]]:
    """Train/test per image, near-duplicate frames clustered into one split (`stages/splits.parquet`)."""
    s = run.cfg.split
    table = assign_splits(usable_images(run.table("stages/qa_dedup.parquet"), run.table("stages/images.parquet")),
                          s.test_fraction, run.cfg.seed, s.near_duplicate_distance)
    write_table(table, run.run_dir / "stages/splits.parquet")
    return ({"images": {str(k): int(v) for k, v in table["split"].value_counts().sort_index().items()}},
            list(SPLITS.outputs))


def shard_files(*configs: dict) -> list[str]:
    """The run-relative paths of a release summary's shard listings (`{split: [{"file": ...}]}`)."""
    return [f"release/{f['file']}" for files in configs for fs in files.values() for f in fs]


def release(run: StageRun) -> tuple[dict, list[str]]:
    """The release's parquet shards of both tracks (`data`, `augmented`). The rows an expert judged wrong
    leave it; every other QA row is released or quarantined with its reason. The card is its own stage: a
    wording change of the card must not rewrite the shards."""
    cfg, run_dir = run.cfg, run.run_dir
    all_qa, split_table, images, augmentations, bad_images, facts = (run.table(t) for t in RELEASE.tables[:6])
    qa, expert = expert_rejected(all_qa, load_verdicts(run_dir), images)
    released = release_rows(qa, split_table, images)
    kept = released["qa_id"]
    rejected = unreleased_rows(qa, kept, bad_images)
    reconcile_ids("QA rows", all_qa["qa_id"], kept, rejected["key"], expert["key"])
    write_table(rejected, run_dir / "stages/quarantine_publish.parquet")
    write_table(expert, run_dir / "stages/quarantine_review.parquet")
    release_dir = run_dir / "release"
    files = write_release(qa, split_table, images, release_dir, cfg.publish)
    augmented, left_out, photometric = {}, {}, 0
    if len(augmentations):
        aug = augmented_rows(released, augmentations, facts, load_catalog(cfg.catalog), run_dir)
        pairs = released[["qa_id", "source", "img_id"]].merge(
            augmentations[["source", "img_id", "variant"]], on=["source", "img_id"])
        reconcile_ids("augmented (row, variant) pairs", zip(pairs["qa_id"], pairs["variant"]),
                      zip(aug.rows["qa_id"], aug.rows["variant"]),
                      set(zip(aug.left_out["qa_id"], aug.left_out["variant"])))
        augmented = write_augmented_release(aug, release_dir, cfg.publish)
        left_out = by_reason(aug.left_out.rename(columns={"question_class": "reason"}))
        photometric = int(aug.rows.loc[~aug.rows["geometry"], ["source", "img_id"]].drop_duplicates().shape[0])
    else:
        shutil.rmtree(release_dir / "augmented", ignore_errors=True)
    return ({"rows": {s: sum(f["rows"] for f in fs) for s, fs in files.items()},
             "augmented_rows": {s: sum(f["rows"] for f in fs) for s, fs in augmented.items()},
             "augmented_left_out": left_out, "photometric_only_images": photometric,
             "dropped_for_images": len(rejected), "expert_rejected": len(expert), "files": files,
             "augmented_files": augmented}, [*RELEASE.outputs, *shard_files(files, augmented)])


def explanation_masks(run: StageRun) -> list[Path]:
    """The segmentation masks the explanations link to (their bytes go into the shards)."""
    return [Path(p) for p in sorted(run.table("stages/explanations.parquet")["segmentation_mask"].unique()) if p]


def release_explanations(run: StageRun) -> tuple[dict, list[str]]:
    """The release's `explanations` config (its own stage: an explanation change rewrites only these shards)."""
    explanations, all_qa, split_table, images = (run.table(t) for t in RELEASE_EXPLANATIONS.tables[:4])
    qa, _ = expert_rejected(all_qa, load_verdicts(run.run_dir), images)  # the rows judged wrong leave both configs
    release_dir = run.run_dir / "release"
    files = write_explanation_release(qa, split_table, images, explanations, release_dir, run.cfg.publish)
    if not files:
        shutil.rmtree(release_dir / "explanations", ignore_errors=True)
    return {"rows": {s: sum(f["rows"] for f in fs) for s, fs in files.items()}, "files": files}, shard_files(files)


def released_shards(run: StageRun) -> list[str]:
    return shard_files(run.summaries["release"]["files"], run.summaries["release"]["augmented_files"],
                       run.summaries["release_explanations"]["files"])


def card(run: StageRun) -> tuple[dict, list[str]]:
    """`release/README.md`, computed from the written shards (see `publish.card`), and the expert review's
    error rates it shows (`review`, also reported by the flow)."""
    cfg, run_dir = run.cfg, run.run_dir
    rel, dedup_figures = run.summaries["release"], {**run.summaries["dedup"], **run.summaries["leakage"]}
    qa, images = run.table("stages/qa_dedup.parquet"), run.table("stages/images.parquet")
    review_rates = error_rates(load_verdicts(run_dir), qa, images)
    catalog = load_catalog(cfg.catalog)
    text, counts = render_card(
        run_dir / "release", rel["files"], pretty_name=cfg.publish.pretty_name, license=cfg.publish.license,
        sources=[{"name": s.name, "kind": s.kind, "license": s.license} for s in cfg.sources],
        generator=", ".join(sorted(qa["generator"].unique())) + f"; catalog {catalog.template_version}",
        config_yaml=run.params["config_text"], quarantine=run_quarantine(run_dir), dedup=dedup_figures,
        augmented_files=rel["augmented_files"],
        augmented_truth={k: rel[k] for k in ("photometric_only_images", "augmented_left_out")},
        augment_recipe=tuple(s.name for s in load_artifact_catalog(cfg.augment.catalog).base),
        explanation_files=run.summaries["release_explanations"]["files"], review=review_rates)
    write_text(text, run_dir / "release/README.md")
    return {"counts": counts, "review": review_rates}, list(CARD.outputs)


def export(run: StageRun) -> tuple[dict, list[str]]:
    """ms-swift JSONL of both tracks in `export/swift/` (see `publish.swift`): its image paths are absolute,
    so the run folder's path is in its key (`run_dir`)."""
    qa, split_table, images, augmentations, facts = (run.table(t) for t in EXPORT.tables[:5])
    qa, _ = expert_rejected(qa, load_verdicts(run.run_dir), images)
    out = run.run_dir / "export" / "swift"
    shutil.rmtree(out, ignore_errors=True)
    rows = release_rows(qa, split_table, images)
    lines = write_swift_jsonl(rows, out, "original")
    if len(augmentations):
        lines |= write_swift_jsonl(augmented_rows(rows, augmentations, facts, load_catalog(run.cfg.catalog),
                                                  run.run_dir).rows, out, "augmented")
    return {"lines": lines}, [f"export/swift/{name}" for name in lines]


SPLITS = Stage("splits", splits, packages=("publish",), config=("split", "seed"),
               unkeyed=("split.leakage_distance",),
               tables=("stages/qa_dedup.parquet", "stages/images.parquet"),
               outputs=("stages/splits.parquet",))
# The augmented rows' boxes and variants are read back from the augment stage's files (their digests are in
# stages/augmentations.parquet, which is in the key).
RELEASE = Stage("release", release, packages=("publish", "review", "augment"), config=SHARD_SETTINGS,
                tables=("stages/qa_dedup.parquet", "stages/splits.parquet", "stages/images.parquet",
                        "stages/augmentations.parquet", "stages/quarantine_images.parquet", "stages/facts.parquet",
                        VERDICTS_FILE), data=("config:catalog",), libraries=("datasets", *RENDER_LIBRARIES),
                outputs=("stages/quarantine_publish.parquet", "stages/quarantine_review.parquet"))
RELEASE_EXPLANATIONS = Stage(
    "release_explanations", release_explanations, packages=("publish", "review"), config=SHARD_SETTINGS,
    tables=("stages/explanations.parquet", "stages/qa_dedup.parquet", "stages/splits.parquet",
            "stages/images.parquet", VERDICTS_FILE), run_inputs=explanation_masks, libraries=SHARD_LIBRARIES)
CARD = Stage("card", card, packages=("publish", "augment", "review"),
             config=("publish.pretty_name", "publish.license", "sources.name", "sources.kind", "sources.license"),
             tables=("stages/qa_dedup.parquet", "stages/images.parquet", VERDICTS_FILE, *QUARANTINE_FILES),
             run_inputs=released_shards, data=("config:catalog", "config:augment.catalog"),
             after=("release", "release_explanations", "dedup", "leakage"), params=("config_text",),
             libraries=RENDER_LIBRARIES,  # the artifact catalog is validated against albumentations
             outputs=("release/README.md",))
EXPORT = Stage("export", export, packages=("publish", "review", "augment"),
               tables=("stages/qa_dedup.parquet", "stages/splits.parquet", "stages/images.parquet",
                       "stages/augmentations.parquet", "stages/facts.parquet", VERDICTS_FILE),
               data=("config:catalog",), params=("run_dir",), libraries=RENDER_LIBRARIES)
