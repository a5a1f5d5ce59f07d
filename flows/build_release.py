"""The `build_release` Prefect flow: source labels -> facts -> plans -> QA -> images -> splits -> release.

Each task is a thin wrapper: it calls one stage function, writes the stage's parquet tables into
`<run_dir>/stages/`, and is skipped on a re-run when its inputs, config and code are unchanged (see
`flows.stage_cache`). Counts are reconciled after every stage; a mismatch is a bug and stops the run.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pandas as pd
from prefect import flow, task
from prefect.cache_policies import NONE

from augment import load_artifact_catalog
from dedup import (DUPLICATE_COLUMNS, LEAKAGE_COLUMNS, EmbeddingCache, encoder_for,
                   cross_split_leakage, deduplicate, question_vectors)
from dedup.frames import cluster_figures, nearest_cross_split_pairs, nearest_distance_figures
from flows.augment_track import augment_track
from flows.dask_runner import embed_on_dask, map_on_dask
from flows.input_stages import by_reason, check_images, parse_sources, reconcile, reconcile_ids
from flows.run_state import class_additions, record_run, run_lock
from flows.stage_cache import cached_stage, code_version, digests, failed_requests_redo
from generate import GroundingChecker, compose_plans, make_backend, realize_plans
from generate.realize import image_chunks, in_plan_order, realize_chunk
from generate.prompts import PROMPTS_DIR
from generate.quality import empty_release_problem, rejection_problem
from kvqa.catalog import load_catalog
from kvqa.config import SAMPLE_CONFIG_PATH, Config, load_config, public_config_yaml
from kvqa.errors import RunRejected
from kvqa.fanout import task_count
from kvqa.tables import file_digest, quarantine_frame, read_table, write_json, write_table, write_text
from publish import assign_splits, render_card, write_release
from publish.release import augmented_rows, release_rows, unreleased_rows, write_augmented_release
from publish.split import usable_images
from publish.swift import write_swift_jsonl
from explain import EXPLANATION_COLUMNS, explain_rows, load_phrasings, make_explainer, mask_index
from publish.release import write_explanation_release
from report import REPORT_INPUTS, write_quality_report
from review import VERDICTS_FILE, error_rates, expert_rejected, load_verdicts

log = logging.getLogger("kvqa")
QUARANTINE_FILES = ["stages/quarantine_sources.parquet", "stages/quarantine_generate.parquet",
                    "stages/quarantine_images.parquet", "stages/quarantine_augment.parquet",
                    "stages/quarantine_publish.parquet", "stages/quarantine_explain.parquet",
                    "stages/quarantine_review.parquet"]  # in stage order: a rejected run reports a prefix
USAGE_FILE = "llm_usage.jsonl"  # the run's LLM usage ledger (generate.llm.UsageLedger)


def verdict_inputs(run_dir: Path) -> dict[str, str]:
    """The digest of the run's recorded expert verdicts (`kvqa review import`), for the keys of the stages
    that leave `wrong` rows out: recording verdicts redoes exactly those."""
    return digests(run_dir, VERDICTS_FILE) if (run_dir / VERDICTS_FILE).is_file() else {}


@task(cache_policy=NONE)
def plan_pairs(cfg: Config, run_dir: Path) -> dict:
    added = class_additions(run_dir)
    key = {"code": code_version("generate"), "plans": cfg.plans.model_dump(mode="json"), "seed": cfg.seed,
           "added_classes": list(added), "inputs": digests(run_dir, "stages/facts.parquet")}

    def build():
        facts = read_table(run_dir / "stages/facts.parquet")
        plans = compose_plans(facts, cfg.plans, cfg.seed, added)
        reconcile("level-1 plans vs facts", len(facts), int((plans["complexity"] == 1).sum()))
        write_table(plans, run_dir / "stages/plans.parquet")
        levels = {int(k): int(v) for k, v in plans["complexity"].value_counts().sort_index().items()}
        return {"plans": len(plans), "per_level": levels}, ["stages/plans.parquet"]

    return cached_stage(run_dir, "plans", key, build)


@task(cache_policy=NONE)
def realize_pairs(cfg: Config, run_dir: Path) -> dict:
    catalog = load_catalog(cfg.catalog)
    key = {"code": code_version("generate"),
           "generate": cfg.generate.model_dump(mode="json", exclude={"max_rejected_share"}),  # a check, not output
           "seed": cfg.seed, "catalog": catalog.digest,
           "prompts": {p.name: file_digest(p) for p in sorted(PROMPTS_DIR.glob("*.yaml"))
                       if p.name != "explain.yaml"},  # the explain stage's prompt, keyed there
           "inputs": digests(run_dir, "stages/facts.parquet", "stages/plans.parquet")}

    def build():
        facts = read_table(run_dir / "stages/facts.parquet")
        plans = read_table(run_dir / "stages/plans.parquet")
        if cfg.runner.kind == "dask" and cfg.generate.backend == "template":
            # LLM backends stay in this process: their requests are concurrent already, and one client
            # holds the cache, the rate limits and the endpoint routing.
            chunks = image_chunks(plans, facts, task_count(len(plans), cfg.runner.n_workers,
                                                           cfg.runner.chunks_per_worker))
            parts = map_on_dask(cfg.runner, "realize", realize_chunk, chunks, cfg.generate, catalog, cfg.seed)
            qa, rejected = in_plan_order(plans, parts)
            usage, failed, second = {}, 0, None  # the template backend sends no requests
        else:
            backend = make_backend(cfg.generate, catalog, cfg.seed, cache_dir=cfg.output_root / "llm-cache",
                                   batch_dir=run_dir / "batch", usage_file=run_dir / USAGE_FILE)
            qa, rejected = realize_plans(plans, facts, backend, GroundingChecker(catalog))
            usage = getattr(backend, "usage", {})
            failed = backend.client.failed_requests() if usage else 0
            second = backend.second_opinion_stats
        reconcile_ids("plans", plans["plan_id"], qa.loc[qa["paraphrase_of"] == "", "qa_id"], rejected["key"])
        write_table(qa, run_dir / "stages/qa.parquet")
        write_table(rejected, run_dir / "stages/quarantine_generate.parquet")
        return ({"plans": len(plans), "qa": len(qa), "rejected": len(rejected), "by_reason": by_reason(rejected),
                 "llm_usage": usage, "failed_requests": failed,
                 **({"second_opinion": second.as_dict()} if second is not None else {})},
                ["stages/qa.parquet", "stages/quarantine_generate.parquet"])

    return cached_stage(run_dir, "generate", key, build, redo=failed_requests_redo)


def _embedding(cfg: Config) -> dict:
    """`deduplicate`'s and `question_vectors`' embedding arguments: the encoder, its on-disk cache
    (`dedup.cache_dir`, else $KVQA_EMBED_CACHE (one cache for runs under several output roots, e.g. CI), else
    `<output_root>/embed-cache`), and with `runner.kind: dask` the Dask workers that encode the blocks."""
    encoder = encoder_for(cfg.dedup)
    folder = Path(cfg.dedup.cache_dir or os.environ.get("KVQA_EMBED_CACHE") or cfg.output_root / "embed-cache")
    folder = folder.resolve()  # the workers' working directory is not ours
    run_blocks = (embed_on_dask(cfg.runner, cfg.dedup, folder, encoder.vectors_id) if cfg.runner.kind == "dask"
                  else None)
    return {"encoder": encoder, "cache": EmbeddingCache(folder, encoder.vectors_id), "run_blocks": run_blocks}


@task(cache_policy=NONE)
def deduplicate_pairs(cfg: Config, run_dir: Path) -> dict:
    key = {"code": code_version("dedup"), "dedup": cfg.dedup.model_dump(mode="json"), "seed": cfg.seed,
           "inputs": digests(run_dir, "stages/qa.parquet")}

    def build():
        qa = read_table(run_dir / "stages/qa.parquet")
        if cfg.dedup.enabled:
            kept, duplicates, figures, timings = deduplicate(qa, cfg.dedup, seed=cfg.seed, **_embedding(cfg))
            log.info("dedup: %d texts embedded (the rest from the cache) in %.1f s, global scope %.1f s",
                     timings["texts_embedded"], timings["embed_s"], timings.get("global_s", 0))
        else:
            kept, duplicates, figures = qa, pd.DataFrame(columns=DUPLICATE_COLUMNS), {"enabled": False}
        reconcile_ids("QA rows through dedup", qa["qa_id"], kept["qa_id"], duplicates["qa_id"])
        write_table(kept, run_dir / "stages/qa_dedup.parquet")
        write_table(duplicates, run_dir / "stages/duplicates.parquet")
        return figures, ["stages/qa_dedup.parquet", "stages/duplicates.parquet"]

    return cached_stage(run_dir, "dedup", key, build)


@task(cache_policy=NONE)
def leakage_report(cfg: Config, run_dir: Path) -> dict:
    """Leakage measured with what the split did not use: each test image's nearest train images (their
    distances can move; the clustered split only guarantees they exceed `near_duplicate_distance`, checked
    here), and test rows repeating a train row's meaning on one of those within `split.leakage_distance`."""
    key = {"code": code_version("dedup"), "dedup": cfg.dedup.model_dump(mode="json"),
           "split": cfg.split.model_dump(mode="json"),
           "inputs": digests(run_dir, "stages/qa_dedup.parquet", "stages/splits.parquet", "stages/images.parquet")}

    def build():
        kept = read_table(run_dir / "stages/qa_dedup.parquet")
        splits = read_table(run_dir / "stages/splits.parquet")
        images = read_table(run_dir / "stages/images.parquet")
        pairs = nearest_cross_split_pairs(images, splits)
        joined = pairs[(pairs["rank"] == 1) & (pairs["distance"] <= cfg.split.near_duplicate_distance)]
        reconcile("test images with a near-duplicate train image after the clustered split", 0, len(joined))
        leaks = pd.DataFrame(columns=LEAKAGE_COLUMNS)
        if cfg.dedup.enabled and "cross-split" in cfg.dedup.scopes and len(kept):
            _, vectors = question_vectors(kept, **_embedding(cfg))
            leaks = cross_split_leakage(kept, vectors, pairs, cfg.dedup.threshold, cfg.split.leakage_distance)
        write_table(leaks, run_dir / "stages/leakage.parquet")
        write_table(pairs, run_dir / "stages/leakage_images.parquet")
        return ({"test_rows_leaking": len(leaks),
                 **nearest_distance_figures(pairs, cfg.split.near_duplicate_distance, cfg.split.leakage_distance),
                 **cluster_figures(splits)}, ["stages/leakage.parquet", "stages/leakage_images.parquet"])

    return cached_stage(run_dir, "leakage", key, build)


@task(cache_policy=NONE)
def split_images(cfg: Config, run_dir: Path) -> dict:
    key = {"code": code_version("publish"), "split": cfg.split.model_dump(mode="json"), "seed": cfg.seed,
           "inputs": digests(run_dir, "stages/qa_dedup.parquet", "stages/images.parquet")}

    def build():
        qa = read_table(run_dir / "stages/qa_dedup.parquet")
        images = read_table(run_dir / "stages/images.parquet")
        splits = assign_splits(usable_images(qa, images), cfg.split.test_fraction, cfg.seed,
                               cfg.split.near_duplicate_distance)
        write_table(splits, run_dir / "stages/splits.parquet")
        return ({"images": {str(k): int(v) for k, v in splits["split"].value_counts().sort_index().items()}},
                ["stages/splits.parquet"])

    return cached_stage(run_dir, "splits", key, build)


@task(cache_policy=NONE)
def write_hub_release(cfg: Config, run_dir: Path) -> dict:
    """The release's parquet shards (both configs). The card is its own stage: a wording change of the
    card must not rewrite the shards."""
    upstream = ["stages/qa_dedup.parquet", "stages/splits.parquet", "stages/images.parquet",
                "stages/augmentations.parquet", "stages/quarantine_images.parquet", "stages/facts.parquet"]
    catalog = load_catalog(cfg.catalog)
    key = {"code": code_version("publish", "review", "augment"), "catalog": catalog.digest,
           "publish": cfg.publish.model_dump(mode="json", include={"max_shard_bytes", "row_group_rows"}),
           "inputs": {**digests(run_dir, *upstream), **verdict_inputs(run_dir)}}

    def build():
        all_qa, splits, images, augmentations, bad_images, facts = (read_table(run_dir / f) for f in upstream)
        qa, expert = expert_rejected(all_qa, load_verdicts(run_dir), images)
        released = release_rows(qa, splits, images)
        kept = released["qa_id"]
        rejected = unreleased_rows(qa, kept, bad_images)
        reconcile_ids("QA rows", all_qa["qa_id"], kept, rejected["key"], expert["key"])
        write_table(rejected, run_dir / "stages/quarantine_publish.parquet")
        write_table(expert, run_dir / "stages/quarantine_review.parquet")
        release_dir = run_dir / "release"
        files = write_release(qa, splits, images, release_dir, cfg.publish)
        augmented, left_out, photometric = {}, {}, 0
        if len(augmentations):
            aug = augmented_rows(released, augmentations, facts, catalog, run_dir)
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
        outputs = ["stages/quarantine_publish.parquet", "stages/quarantine_review.parquet",
                   *[f"release/{f['file']}" for config in (files, augmented) for fs in config.values() for f in fs]]
        return {"rows": {s: sum(f["rows"] for f in fs) for s, fs in files.items()},
                "augmented_rows": {s: sum(f["rows"] for f in fs) for s, fs in augmented.items()},
                "augmented_left_out": left_out, "photometric_only_images": photometric,
                "dropped_for_images": len(rejected), "expert_rejected": len(expert), "files": files, "augmented_files": augmented}, outputs

    return cached_stage(run_dir, "release", key, build)


@task(cache_policy=NONE)
def explain_pairs(cfg: Config, run_dir: Path) -> dict:
    """A grounded explanation and the source boxes per kept QA row (see `explain.explain`)."""
    catalog = load_catalog(cfg.catalog)
    ex = cfg.explain
    mask_dirs = {s.name: s.masks_dir for s in cfg.sources if getattr(s, "masks_dir", None)}
    key = {"code": code_version("explain"),
           "explain": ex.model_dump(mode="json", exclude={"phrasings", "max_rejected_share"}),  # a check
           "seed": cfg.seed, "catalog": catalog.digest, "phrasings": file_digest(ex.phrasings),
           "prompt": file_digest(PROMPTS_DIR / "explain.yaml"), "mask_dirs": {k: str(v) for k, v in mask_dirs.items()},
           "inputs": digests(run_dir, "stages/qa_dedup.parquet", "stages/plans.parquet", "stages/facts.parquet")}

    def build():
        qa = read_table(run_dir / "stages/qa_dedup.parquet")
        table, rejected = pd.DataFrame(columns=EXPLANATION_COLUMNS), quarantine_frame([])
        usage, failed = {}, 0
        if ex.enabled:
            phrasings = load_phrasings(ex.phrasings, catalog)
            backend = make_explainer(ex.backend, ex.llm, catalog, phrasings, cfg.seed,
                                     cache_dir=cfg.output_root / "llm-cache", batch_dir=run_dir / "batch",
                                     usage_file=run_dir / USAGE_FILE)
            table, rejected = explain_rows(qa, read_table(run_dir / "stages/plans.parquet"),
                                           read_table(run_dir / "stages/facts.parquet"), backend,
                                           GroundingChecker(catalog), phrasings, mask_index(mask_dirs))
            usage = getattr(backend, "usage", {})
            failed = backend.client.failed_requests() if usage else 0
            reconcile_ids("QA rows explained", qa["qa_id"], table["qa_id"], rejected["key"])
        write_table(table, run_dir / "stages/explanations.parquet")
        write_table(rejected, run_dir / "stages/quarantine_explain.parquet")
        return ({"enabled": ex.enabled, "rows": len(qa), "explained": len(table), "rejected": len(rejected),
                 "with_boxes": int(table["visual_explanation"].map(len).gt(0).sum()),
                 "with_masks": int(table["segmentation_mask"].astype(bool).sum()),
                 "by_reason": by_reason(rejected), "llm_usage": usage, "failed_requests": failed},
                ["stages/explanations.parquet", "stages/quarantine_explain.parquet"])

    return cached_stage(run_dir, "explain", key, build, redo=failed_requests_redo)


@task(cache_policy=NONE)
def write_explanations_config(cfg: Config, run_dir: Path) -> dict:
    """The release's `explanations` config (its own stage: an explanation change rewrites only these shards)."""
    upstream = ["stages/explanations.parquet", "stages/qa_dedup.parquet", "stages/splits.parquet",
                "stages/images.parquet"]
    masks = sorted(p for p in read_table(run_dir / upstream[0])["segmentation_mask"].unique() if p)
    key = {"code": code_version("publish", "review"),
           "publish": cfg.publish.model_dump(mode="json", include={"max_shard_bytes", "row_group_rows"}),
           "inputs": {**digests(run_dir, *upstream), **verdict_inputs(run_dir)},
           "masks": {p: file_digest(Path(p)) for p in masks}}

    def build():
        explanations, all_qa, splits, images = (read_table(run_dir / f) for f in upstream)
        qa, _ = expert_rejected(all_qa, load_verdicts(run_dir), images)  # the rows judged wrong leave both configs
        release_dir = run_dir / "release"
        files = write_explanation_release(qa, splits, images, explanations, release_dir, cfg.publish)
        if not files:
            shutil.rmtree(release_dir / "explanations", ignore_errors=True)
        return ({"rows": {s: sum(f["rows"] for f in fs) for s, fs in files.items()}, "files": files},
                [f"release/{f['file']}" for fs in files.values() for f in fs])

    return cached_stage(run_dir, "release_explanations", key, build)


@task(cache_policy=NONE)
def write_dataset_card(cfg: Config, run_dir: Path, release: dict, config_text: str, dedup_figures: dict,
                       leakage: dict, review_rates: list[dict] | None = None) -> dict:
    """`release/README.md`, computed from the written shards (see `publish.card`)."""
    shards = [f"release/{f['file']}" for key in ("files", "augmented_files", "explanation_files")
              for fs in release.get(key, {}).values() for f in fs]
    catalog = load_catalog(cfg.catalog)
    key = {"code": code_version("publish", "augment"),
           "publish": cfg.publish.model_dump(mode="json", include={"pretty_name", "license"}),
           "sources": [(s.name, s.kind, s.license) for s in cfg.sources], "config_text": config_text,
           "catalog": catalog.template_version, "augment_catalog": file_digest(cfg.augment.catalog),
           "dedup": dedup_figures, "leakage": leakage, "review": review_rates or [],
           "augmented_truth": [release.get("photometric_only_images"), release.get("augmented_left_out")], "inputs": digests(run_dir, *shards, *QUARANTINE_FILES,
                                                                         "stages/qa_dedup.parquet")}

    def build():
        qa = read_table(run_dir / "stages/qa_dedup.parquet")
        quarantine = pd.concat([read_table(run_dir / f) for f in QUARANTINE_FILES], ignore_index=True)
        card, counts = render_card(
            run_dir / "release", release["files"], pretty_name=cfg.publish.pretty_name, license=cfg.publish.license,
            sources=[{"name": s.name, "kind": s.kind, "license": s.license} for s in cfg.sources],
            generator=", ".join(sorted(qa["generator"].unique())) + f"; catalog {catalog.template_version}",
            config_yaml=config_text, quarantine=quarantine, dedup={**dedup_figures, **leakage},
            augmented_files=release["augmented_files"],
            augmented_truth={k: release[k] for k in ("photometric_only_images", "augmented_left_out")},
            augment_recipe=tuple(s.name for s in load_artifact_catalog(cfg.augment.catalog).base),
            explanation_files=release.get("explanation_files"), review=review_rates)
        write_text(card, run_dir / "release/README.md")
        return {"counts": counts}, ["release/README.md"]

    return cached_stage(run_dir, "card", key, build)


@task(cache_policy=NONE)
def export_swift(cfg: Config, run_dir: Path) -> dict:
    """ms-swift JSONL of both tracks in `export/swift/` (see `publish.swift`)."""
    upstream = ["stages/qa_dedup.parquet", "stages/splits.parquet", "stages/images.parquet",
                "stages/augmentations.parquet", "stages/facts.parquet"]
    catalog = load_catalog(cfg.catalog)
    key = {"code": code_version("publish", "review", "augment"), "run_dir": str(run_dir), "catalog": catalog.digest,
           "inputs": {**digests(run_dir, *upstream), **verdict_inputs(run_dir)}}

    def build():
        qa, splits, images, augmentations, facts = (read_table(run_dir / f) for f in upstream)
        qa, _ = expert_rejected(qa, load_verdicts(run_dir), images)
        out = run_dir / "export" / "swift"
        shutil.rmtree(out, ignore_errors=True)
        rows = release_rows(qa, splits, images)
        lines = write_swift_jsonl(rows, out, "original")
        if len(augmentations):
            lines |= write_swift_jsonl(augmented_rows(rows, augmentations, facts, catalog, run_dir).rows, out,
                                       "augmented")
        return {"lines": lines}, [f"export/swift/{name}" for name in lines]

    return cached_stage(run_dir, "export", key, build)


@task(cache_policy=NONE)
def write_report(cfg: Config, run_dir: Path, report: dict, review_rates: list[dict]) -> dict:
    """`report.html` and `report_files/` (see `report.page`): the last stage, from the run's tables."""
    shards = sorted(str(p.relative_to(run_dir)) for p in (run_dir / "release").rglob("*.parquet"))
    extra = [f for f in ("augment/contact-sheet.png",) if (run_dir / f).is_file()]
    key = {"code": code_version("report"), "run_name": cfg.run_name, "dedup": report["dedup"],
           "leakage": report["leakage"], "review": review_rates,
           "inputs": digests(run_dir, *REPORT_INPUTS, *shards, *extra)}
    return cached_stage(run_dir, "report", key, lambda: write_quality_report(
        run_dir, cfg.run_name, report["dedup"], report["leakage"], review_rates))


def write_quarantine(run_dir: Path, report: dict, quarantine_files: list[str]) -> pd.DataFrame:
    """`quarantine.parquet` (the given stages' quarantine tables), its counts in `report`; returns it."""
    quarantine = pd.concat([read_table(run_dir / f) for f in quarantine_files], ignore_index=True)
    write_table(quarantine, run_dir / "quarantine.parquet")
    report["quarantine"] = {"total": len(quarantine),
                            "by_stage_reason": {f"{s}/{r}": int(n) for (s, r), n in
                                                quarantine.groupby(["stage", "reason"]).size().items()}}
    return quarantine


def reject_if(problem: str | None, run_dir: Path, report: dict, quarantine_files: list[str]) -> None:
    """Raise `RunRejected` with `problem` (when there is one) after writing what the run knows: `report.json`
    and `quarantine.parquet` of the stages run so far (`quarantine_files`: theirs only, not a table that a
    previous run of a later stage left)."""
    if problem is None:
        return
    report["rejected"] = problem
    write_quarantine(run_dir, report, quarantine_files)
    write_json(report, run_dir / "report.json")
    raise RunRejected(problem)


@flow(name="build_release", log_prints=True)
def build_release(config_path: str | None = None, output_root: str | None = None) -> dict:
    """Build a Hub-ready release folder in `<output_root>/<run_name>/release` and a run report."""
    overrides = {"output_root": output_root} if output_root else None
    cfg = load_config(config_path, overrides)
    # The card shows the validated config with credentials redacted and paths relative to its folder.
    config_text = public_config_yaml(cfg, Path(config_path or SAMPLE_CONFIG_PATH).resolve().parent)
    run_dir = Path(cfg.run_dir)
    with run_lock(run_dir, "build_release"):
        (run_dir / "stages").mkdir(parents=True, exist_ok=True)
        record_run(run_dir, Path(config_path or SAMPLE_CONFIG_PATH))
        report = {"run_name": cfg.run_name, "seed": cfg.seed, "added_classes": list(class_additions(run_dir))}
        report["sources"] = parse_sources(cfg, run_dir)
        report["plans"] = plan_pairs(cfg, run_dir)
        report["generate"] = realize_pairs(cfg, run_dir)
        g = report["generate"]
        reject_if(rejection_problem(g["plans"], g["by_reason"], cfg.generate.max_rejected_share), run_dir, report,
                  QUARANTINE_FILES[:2])
        report["dedup"] = deduplicate_pairs(cfg, run_dir)
        report["images"] = check_images(cfg, run_dir)
        report["augment"] = augment_track(config_path, output_root, inputs_ready=True)
        report["splits"] = split_images(cfg, run_dir)
        report["leakage"] = leakage_report(cfg, run_dir)
        release = write_hub_release(cfg, run_dir)
        report["release"] = {k: v for k, v in release.items() if k not in ("files", "augmented_files")}
        report["explain"] = explain_pairs(cfg, run_dir)
        e = report["explain"]
        reject_if(rejection_problem(e["rows"], e["by_reason"], cfg.explain.max_rejected_share, "QA rows", "explain"),
                  run_dir, report, QUARANTINE_FILES[:6])
        explained = write_explanations_config(cfg, run_dir)
        release["explanation_files"] = explained["files"]
        report["release"]["explanation_rows"] = explained["rows"]
        review_rates = error_rates(load_verdicts(run_dir), read_table(run_dir / "stages/qa_dedup.parquet"),
                                   read_table(run_dir / "stages/images.parquet"))
        report["card"] = write_dataset_card(cfg, run_dir, release, config_text, report["dedup"], report["leakage"],
                                            review_rates)
        report["export"] = export_swift(cfg, run_dir)
        quarantine = write_quarantine(run_dir, report, QUARANTINE_FILES)
        if review_rates:
            report["review"] = review_rates
        report["quality_report"] = write_report(cfg, run_dir, report, review_rates)
        write_json(report, run_dir / "report.json")  # no paths or timings: it must be identical across runs
        if problem := empty_release_problem(report["release"]["rows"], report["quarantine"]["by_stage_reason"]):
            raise RunRejected(problem)  # report.json and quarantine.parquet are written
        rows = report["release"]["rows"]
        log.info("release written to %s: %s rows (%s), %d quarantined", run_dir / "release",
                 sum(rows.values()), ", ".join(f"{k} {v}" for k, v in rows.items()), len(quarantine))
        return {**report, "run_dir": str(run_dir), "release_dir": str(run_dir / "release")}
