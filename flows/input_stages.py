"""The input stages both flows start from: source labels -> facts, and the inventory of their images.

`build_release` and `augment_track` each run these (cached across runs by `flows.stage_cache`), so the
augmented track can be made on its own from a config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import pandas as pd
from prefect import task
from prefect.cache_policies import NONE

from flows.stage_cache import cached_stage, code_version, digests
from kvqa.catalog import load_catalog
from kvqa.config import Config
from kvqa.tables import file_digest, read_table, stable_hash, write_table
from sources import read_sources, units_in_facts
from sources.images import inventory_images


class ReconciliationError(RuntimeError):
    """Counts that must add up did not: rows were lost or invented between stages."""


def reconcile(what: str, total: int, *parts: int) -> None:
    if total != sum(parts):
        raise ReconciliationError(f"{what}: {total} in, {' + '.join(map(str, parts))} = {sum(parts)} out")


def reconcile_ids(what: str, total: Iterable, *parts: Iterable) -> None:
    """Every id in, in exactly one part out: two errors whose counts cancel out cannot pass."""
    total, parts = set(total), [list(p) for p in parts]
    out = [i for p in parts for i in p]
    twice = len(out) - len(set(out))
    if set(out) != total or twice:
        missing, extra = sorted(map(str, total - set(out)))[:3], sorted(map(str, set(out) - total))[:3]
        raise ReconciliationError(f"{what}: {len(total)} in, {' + '.join(str(len(p)) for p in parts)} out; "
                                  f"missing {missing}, unknown {extra}, {twice} in two parts")


def by_reason(q: pd.DataFrame) -> dict[str, int]:
    return {str(k): int(v) for k, v in q["reason"].value_counts().sort_index().items()}


@task(cache_policy=NONE)
def parse_sources(cfg: Config, run_dir: Path) -> dict:
    catalog = load_catalog(cfg.catalog)
    key = {"code": code_version("sources"), "sources": [s.model_dump(mode="json") for s in cfg.sources],
           "inputs": [input_digest(Path(p)) for s in cfg.sources for p in s.label_files],
           "catalog": catalog.digest}

    def build():
        parsed = read_sources(cfg.sources, catalog)
        in_facts = units_in_facts(parsed.facts)
        reconcile("label rows", parsed.rows_read, in_facts, len(parsed.quarantine))
        write_table(parsed.facts, run_dir / "stages/facts.parquet")
        write_table(parsed.quarantine, run_dir / "stages/quarantine_sources.parquet")
        return ({"rows_read": parsed.rows_read, "rows_in_facts": in_facts, "facts": len(parsed.facts),
                 "quarantined": len(parsed.quarantine), "by_reason": by_reason(parsed.quarantine),
                 "label_conflicts": parsed.label_conflicts},
                ["stages/facts.parquet", "stages/quarantine_sources.parquet"])

    return cached_stage(run_dir, "sources", key, build)


def input_digest(path: Path) -> str:
    """A label file's digest, or for a folder of label files (masks) the digest of every file in it."""
    if path.is_dir():
        return stable_hash(*(f"{p.name}:{file_digest(p)}" for p in sorted(path.iterdir()) if p.is_file()))
    return file_digest(path)


def image_listing(cfg: Config) -> list[str]:
    """Names, sizes and mtimes of the image folders: a cheap key; content hashes go into the table."""
    out = []
    for s in cfg.sources:
        d = Path(s.image_dir)
        files = (sorted(d.rglob("*")) if s.recursive_images else sorted(d.iterdir())) if d.is_dir() else []
        out.append(f"{s.name}:{d}:" + ",".join(f"{p.relative_to(d)}/{p.stat().st_size}/{p.stat().st_mtime_ns}"
                                               for p in files if p.is_file()))
    return out


def image_check_runner(cfg: Config) -> dict:
    """`inventory_images` keyword arguments for the configured runner: in this process (`local`), or about
    `chunks_per_worker` chunks per worker (never more than the images) as Prefect task runs on Dask."""
    r = cfg.runner
    if r.kind != "dask":
        return {}
    from flows.dask_runner import map_on_dask  # distributed and the augment code: only when asked for

    return {"chunks": r.n_workers * r.chunks_per_worker,
            "map_chunks": lambda fn, chunks: map_on_dask(r, "check-images", fn, chunks)}


@task(cache_policy=NONE)
def check_images(cfg: Config, run_dir: Path) -> dict:
    key = {"code": code_version("sources"), "listing": image_listing(cfg),
           "sources": [s.model_dump(mode="json") for s in cfg.sources],
           "inputs": digests(run_dir, "stages/facts.parquet")}

    def build():
        facts = read_table(run_dir / "stages/facts.parquet")
        images, bad = inventory_images(facts, cfg.sources, **image_check_runner(cfg))
        reconcile_ids("images", zip(facts["source"], facts["img_id"]), zip(images["source"], images["img_id"]),
                      zip(bad["source"], bad["key"]))
        write_table(images, run_dir / "stages/images.parquet")
        write_table(bad, run_dir / "stages/quarantine_images.parquet")
        return ({"images": len(images) + len(bad), "usable": len(images), "quarantined": len(bad),
                 "by_reason": by_reason(bad)}, ["stages/images.parquet", "stages/quarantine_images.parquet"])

    return cached_stage(run_dir, "images", key, build)
