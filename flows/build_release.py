"""The `build_release` Prefect flow: source labels -> facts -> plans -> QA -> images -> splits -> release.

Each task is a thin wrapper: it calls one stage function, writes the stage's parquet tables into
`<run_dir>/stages/`, and is skipped on a re-run when its inputs, config and code are unchanged (see
`flows.stage_cache`). Counts are reconciled after every stage; a mismatch is a bug and stops the run.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
from prefect import flow, task
from prefect.cache_policies import NONE

from flows.stage_cache import cached_stage, code_version, digests
from generate import GroundingChecker, compose_plans, make_backend, realize_plans
from dedup import (DUPLICATE_COLUMNS, LEAKAGE_COLUMNS, EmbeddingCache, SentenceTransformerEncoder,
                   cross_split_leakage, deduplicate, question_vectors)
from generate.prompts import PROMPTS_DIR
from kvqa.catalog import load_catalog
from kvqa.config import SAMPLE_CONFIG_PATH, Config, load_config
from kvqa.tables import file_digest, quarantine_frame, read_table, write_json, write_table, write_text
from publish import assign_splits, render_card, write_release
from publish.release import release_rows
from sources import read_sources
from sources.images import inventory_images

log = logging.getLogger("kvqa")
QUARANTINE_FILES = ["stages/quarantine_sources.parquet", "stages/quarantine_generate.parquet",
                    "stages/quarantine_images.parquet", "stages/quarantine_publish.parquet"]


class ReconciliationError(RuntimeError):
    """Counts that must add up did not: rows were lost or invented between stages."""


def reconcile(what: str, total: int, *parts: int) -> None:
    if total != sum(parts):
        raise ReconciliationError(f"{what}: {total} in, {' + '.join(map(str, parts))} = {sum(parts)} out")


def _by_reason(q: pd.DataFrame) -> dict[str, int]:
    return {str(k): int(v) for k, v in q["reason"].value_counts().sort_index().items()}


@task(cache_policy=NONE)
def parse_sources(cfg: Config, run_dir: Path) -> dict:
    catalog = load_catalog(cfg.catalog)
    key = {"code": code_version("sources"), "sources": [s.model_dump(mode="json") for s in cfg.sources],
           "inputs": [file_digest(Path(s.metadata_csv)) for s in cfg.sources],
           "catalog": catalog.digest}

    def build():
        parsed = read_sources(cfg.sources, catalog)
        in_facts = int(parsed.facts["source_rows"].map(len).sum())
        reconcile("label rows", parsed.rows_read, in_facts, len(parsed.quarantine))
        write_table(parsed.facts, run_dir / "stages/facts.parquet")
        write_table(parsed.quarantine, run_dir / "stages/quarantine_sources.parquet")
        return ({"rows_read": parsed.rows_read, "rows_in_facts": in_facts, "facts": len(parsed.facts),
                 "quarantined": len(parsed.quarantine), "by_reason": _by_reason(parsed.quarantine)},
                ["stages/facts.parquet", "stages/quarantine_sources.parquet"])

    return cached_stage(run_dir, "sources", key, build)


@task(cache_policy=NONE)
def plan_pairs(cfg: Config, run_dir: Path) -> dict:
    key = {"code": code_version("generate"), "plans": cfg.plans.model_dump(mode="json"), "seed": cfg.seed,
           "inputs": digests(run_dir, "stages/facts.parquet")}

    def build():
        facts = read_table(run_dir / "stages/facts.parquet")
        plans = compose_plans(facts, cfg.plans, cfg.seed)
        reconcile("level-1 plans vs facts", len(facts), int((plans["complexity"] == 1).sum()))
        write_table(plans, run_dir / "stages/plans.parquet")
        levels = {int(k): int(v) for k, v in plans["complexity"].value_counts().sort_index().items()}
        return {"plans": len(plans), "per_level": levels}, ["stages/plans.parquet"]

    return cached_stage(run_dir, "plans", key, build)


@task(cache_policy=NONE)
def realize_pairs(cfg: Config, run_dir: Path) -> dict:
    catalog = load_catalog(cfg.catalog)
    key = {"code": code_version("generate"), "generate": cfg.generate.model_dump(mode="json"),
           "seed": cfg.seed, "catalog": catalog.digest,
           "prompts": {p.name: file_digest(p) for p in sorted(PROMPTS_DIR.glob("*.yaml"))},
           "inputs": digests(run_dir, "stages/facts.parquet", "stages/plans.parquet")}

    def build():
        facts = read_table(run_dir / "stages/facts.parquet")
        plans = read_table(run_dir / "stages/plans.parquet")
        backend = make_backend(cfg.generate, catalog, cfg.seed, cache_dir=cfg.output_root / "llm-cache",
                               batch_dir=run_dir / "batch")
        qa, rejected = realize_plans(plans, facts, backend, GroundingChecker(catalog))
        reconcile("plans", len(plans), int((~qa["qa_id"].str.contains(r"-p\d+$")).sum()), len(rejected))
        write_table(qa, run_dir / "stages/qa.parquet")
        write_table(rejected, run_dir / "stages/quarantine_generate.parquet")
        return ({"plans": len(plans), "qa": len(qa), "rejected": len(rejected), "by_reason": _by_reason(rejected),
                 "llm_usage": getattr(backend, "usage", {})},
                ["stages/qa.parquet", "stages/quarantine_generate.parquet"])

    return cached_stage(run_dir, "generate", key, build)


def _image_listing(cfg: Config) -> list[str]:
    """Names, sizes and mtimes of the image folders: a cheap key; content hashes go into the table."""
    out = []
    for s in cfg.sources:
        d = Path(s.image_dir)
        files = sorted(d.iterdir()) if d.is_dir() else []
        out.append(f"{s.name}:{d}:" + ",".join(f"{p.name}/{p.stat().st_size}/{p.stat().st_mtime_ns}"
                                               for p in files if p.is_file()))
    return out


def _encoder_and_cache(cfg: Config):
    encoder = SentenceTransformerEncoder(cfg.dedup.model, cfg.dedup.batch_size)
    return encoder, EmbeddingCache(cfg.dedup.cache_dir or cfg.output_root / "embed-cache", encoder.model_id)


@task(cache_policy=NONE)
def deduplicate_pairs(cfg: Config, run_dir: Path) -> dict:
    key = {"code": code_version("dedup"), "dedup": cfg.dedup.model_dump(mode="json"), "seed": cfg.seed,
           "inputs": digests(run_dir, "stages/qa.parquet")}

    def build():
        qa = read_table(run_dir / "stages/qa.parquet")
        if cfg.dedup.enabled:
            kept, duplicates, figures, timings = deduplicate(qa, cfg.dedup, *_encoder_and_cache(cfg), seed=cfg.seed)
            log.info("dedup: embedding %.1f s, global scope %.1f s", timings["embed_s"], timings.get("global_s", 0))
        else:
            kept, duplicates, figures = qa, pd.DataFrame(columns=DUPLICATE_COLUMNS), {"enabled": False}
        reconcile("QA rows through dedup", len(qa), len(kept), len(duplicates))
        write_table(kept, run_dir / "stages/qa_dedup.parquet")
        write_table(duplicates, run_dir / "stages/duplicates.parquet")
        return figures, ["stages/qa_dedup.parquet", "stages/duplicates.parquet"]

    return cached_stage(run_dir, "dedup", key, build)


@task(cache_policy=NONE)
def leakage_report(cfg: Config, run_dir: Path) -> dict:
    key = {"code": code_version("dedup"), "dedup": cfg.dedup.model_dump(mode="json"),
           "inputs": digests(run_dir, "stages/qa_dedup.parquet", "stages/splits.parquet", "stages/images.parquet")}

    def build():
        kept = read_table(run_dir / "stages/qa_dedup.parquet")
        leaks = pd.DataFrame(columns=LEAKAGE_COLUMNS)
        if cfg.dedup.enabled and "cross-split" in cfg.dedup.scopes and len(kept):
            _, vectors = question_vectors(kept, *_encoder_and_cache(cfg))
            leaks = cross_split_leakage(kept, vectors, read_table(run_dir / "stages/splits.parquet"),
                                        read_table(run_dir / "stages/images.parquet"), cfg.dedup.threshold)
        write_table(leaks, run_dir / "stages/leakage.parquet")
        return {"test_rows_leaking": len(leaks)}, ["stages/leakage.parquet"]

    return cached_stage(run_dir, "leakage", key, build)


@task(cache_policy=NONE)
def check_images(cfg: Config, run_dir: Path) -> dict:
    key = {"code": code_version("sources"), "listing": _image_listing(cfg),
           "sources": [s.model_dump(mode="json") for s in cfg.sources],
           "inputs": digests(run_dir, "stages/facts.parquet")}

    def build():
        facts = read_table(run_dir / "stages/facts.parquet")
        images, bad = inventory_images(facts, cfg.sources)
        reconcile("images", int(facts[["source", "img_id"]].drop_duplicates().shape[0]), len(images), len(bad))
        write_table(images, run_dir / "stages/images.parquet")
        write_table(bad, run_dir / "stages/quarantine_images.parquet")
        return ({"images": len(images) + len(bad), "usable": len(images), "quarantined": len(bad),
                 "by_reason": _by_reason(bad)}, ["stages/images.parquet", "stages/quarantine_images.parquet"])

    return cached_stage(run_dir, "images", key, build)


@task(cache_policy=NONE)
def split_images(cfg: Config, run_dir: Path) -> dict:
    key = {"code": code_version("publish"), "split": cfg.split.model_dump(mode="json"), "seed": cfg.seed,
           "inputs": digests(run_dir, "stages/qa_dedup.parquet", "stages/images.parquet")}

    def build():
        qa = read_table(run_dir / "stages/qa_dedup.parquet")
        images = read_table(run_dir / "stages/images.parquet")
        usable = (qa[["source", "img_id", "source_label"]].drop_duplicates()
                  .merge(images[["source", "img_id"]], on=["source", "img_id"]))
        splits = assign_splits(usable, cfg.split.test_fraction, cfg.seed)
        write_table(splits, run_dir / "stages/splits.parquet")
        return ({"images": {str(k): int(v) for k, v in splits["split"].value_counts().sort_index().items()}},
                ["stages/splits.parquet"])

    return cached_stage(run_dir, "splits", key, build)


@task(cache_policy=NONE)
def write_hub_release(cfg: Config, run_dir: Path, config_text: str, dedup_figures: dict, leakage: dict) -> dict:
    upstream = ["stages/qa_dedup.parquet", "stages/splits.parquet", "stages/images.parquet", *QUARANTINE_FILES[:3]]
    key = {"code": code_version("publish"), "publish": cfg.publish.model_dump(mode="json"),
           "sources": [(s.name, s.kind, s.license) for s in cfg.sources], "config_text": config_text,
           "dedup": dedup_figures, "leakage": leakage,
           "inputs": digests(run_dir, *upstream)}

    def build():
        qa = read_table(run_dir / "stages/qa_dedup.parquet")
        splits = read_table(run_dir / "stages/splits.parquet")
        images = read_table(run_dir / "stages/images.parquet")
        kept = release_rows(qa, splits, images)["qa_id"]
        bad_images = read_table(run_dir / "stages/quarantine_images.parquet")
        reasons = dict(zip(zip(bad_images["source"], bad_images["key"]), bad_images["reason"]))
        dropped = qa[~qa["qa_id"].isin(kept)]
        rejected = quarantine_frame([
            {"stage": "publish", "source": r.source, "key": r.qa_id,
             "reason": "image_quarantined", "detail": f"image {r.img_id}: {reasons.get((r.source, r.img_id), '?')}",
             "raw": ""} for r in dropped.itertuples(index=False)])
        reconcile("QA rows", len(qa), len(kept), len(rejected))
        write_table(rejected, run_dir / "stages/quarantine_publish.parquet")
        release_dir = run_dir / "release"
        files = write_release(qa, splits, images, release_dir, cfg.publish)
        quarantine = pd.concat([read_table(run_dir / f) for f in QUARANTINE_FILES], ignore_index=True)
        card, counts = render_card(
            release_dir, files, pretty_name=cfg.publish.pretty_name, license=cfg.publish.license,
            sources=[{"name": s.name, "kind": s.kind, "license": s.license} for s in cfg.sources],
            generator=str(qa["generator_version"].iloc[0]) if len(qa) else "none",
            config_yaml=config_text, quarantine=quarantine, dedup={**dedup_figures, **leakage})
        write_text(card, release_dir / "README.md")
        outputs = ["stages/quarantine_publish.parquet", "release/README.md",
                   *[f"release/{f['file']}" for fs in files.values() for f in fs]]
        return {"rows": {s: sum(f["rows"] for f in fs) for s, fs in files.items()},
                "dropped_for_images": len(rejected), "counts": counts}, outputs

    return cached_stage(run_dir, "release", key, build)


@flow(name="build_release", log_prints=True)
def build_release(config_path: str | None = None, output_root: str | None = None) -> dict:
    """Build a Hub-ready release folder in `<output_root>/<run_name>/release` and a run report."""
    overrides = {"output_root": output_root} if output_root else None
    cfg = load_config(config_path, overrides)
    config_text = Path(config_path or SAMPLE_CONFIG_PATH).read_text()
    run_dir = Path(cfg.run_dir)
    (run_dir / "stages").mkdir(parents=True, exist_ok=True)
    report = {"run_name": cfg.run_name, "seed": cfg.seed}
    report["sources"] = parse_sources(cfg, run_dir)
    report["plans"] = plan_pairs(cfg, run_dir)
    report["generate"] = realize_pairs(cfg, run_dir)
    report["dedup"] = deduplicate_pairs(cfg, run_dir)
    report["images"] = check_images(cfg, run_dir)
    report["splits"] = split_images(cfg, run_dir)
    report["leakage"] = leakage_report(cfg, run_dir)
    report["release"] = write_hub_release(cfg, run_dir, config_text, report["dedup"], report["leakage"])
    quarantine = pd.concat([read_table(run_dir / f) for f in QUARANTINE_FILES], ignore_index=True)
    write_table(quarantine, run_dir / "quarantine.parquet")
    report["quarantine"] = {"total": len(quarantine),
                            "by_stage_reason": {f"{s}/{r}": int(n) for (s, r), n in
                                                quarantine.groupby(["stage", "reason"]).size().items()}}
    write_json(report, run_dir / "report.json")  # no paths or timings: it must be identical across runs
    rows = report["release"]["rows"]
    log.info("release written to %s: %s rows (%s), %d quarantined", run_dir / "release",
             sum(rows.values()), ", ".join(f"{k} {v}" for k, v in rows.items()), len(quarantine))
    return {**report, "run_dir": str(run_dir), "release_dir": str(run_dir / "release")}
