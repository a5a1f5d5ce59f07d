"""The input stages every flow starts from: source labels -> facts, and the inventory of their images."""

from __future__ import annotations

from kvqa.catalog import load_catalog
from kvqa.reconcile import by_reason, reconcile, reconcile_ids
from kvqa.stage import Stage, StageRun
from kvqa.tables import write_table
from sources import read_sources, units_in_facts
from sources.images import inventory_images


def sources(run: StageRun) -> tuple[dict, list[str]]:
    """Read every configured label file into `stages/facts.parquet`; what cannot be read is quarantined."""
    parsed = read_sources(run.cfg.sources, load_catalog(run.cfg.catalog))
    in_facts = units_in_facts(parsed.facts)
    reconcile("label rows", parsed.rows_read, in_facts, len(parsed.quarantine))
    write_table(parsed.facts, run.run_dir / "stages/facts.parquet")
    write_table(parsed.quarantine, run.run_dir / "stages/quarantine_sources.parquet")
    return ({"rows_read": parsed.rows_read, "rows_in_facts": in_facts, "facts": len(parsed.facts),
             "quarantined": len(parsed.quarantine), "by_reason": by_reason(parsed.quarantine),
             "label_conflicts": parsed.label_conflicts}, list(SOURCES.outputs))


def images(run: StageRun) -> tuple[dict, list[str]]:
    """Locate, decode and fingerprint every image the facts name (`stages/images.parquet`)."""
    facts = run.table("stages/facts.parquet")
    r = run.cfg.runner
    fan_out = ({} if run.runners.map is None else
               {"chunks": r.n_workers * r.chunks_per_worker,
                "map_chunks": lambda fn, chunks: run.runners.map("check-images", fn, chunks)})
    usable, bad = inventory_images(facts, run.cfg.sources, **fan_out)
    reconcile_ids("images", zip(facts["source"], facts["img_id"]), zip(usable["source"], usable["img_id"]),
                  zip(bad["source"], bad["key"]))
    write_table(usable, run.run_dir / "stages/images.parquet")
    write_table(bad, run.run_dir / "stages/quarantine_images.parquet")
    return ({"images": len(usable) + len(bad), "usable": len(usable), "quarantined": len(bad),
             "by_reason": by_reason(bad)}, list(IMAGES.outputs))


SOURCES = Stage("sources", sources, packages=("sources",), config=("sources",),
                data=("config:catalog", "config:sources.label_files"), libraries=("pillow",),
                outputs=("stages/facts.parquet", "stages/quarantine_sources.parquet"))
# Image folders are keyed by their listing (names, sizes, mtimes); each image's content digest is in the table.
IMAGES = Stage("images", images, packages=("sources",), config=("sources",), tables=("stages/facts.parquet",),
               listings=("config:sources.image_dir",), libraries=("pillow", "imagehash", "scipy"),
               outputs=("stages/images.parquet", "stages/quarantine_images.parquet"))
