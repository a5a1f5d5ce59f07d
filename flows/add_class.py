"""The `add_question_class` Prefect flow: add a catalog class's pairs to a built run, leaving its rows as they are.

The class is appended to the run's `class_additions.json` and the release flow runs again. Everything
that does not depend on the new class is unchanged by construction: facts are per class, the base plans
are drawn without added classes (`generate.plans.compose_plans`), the new class's plans are drawn on top,
realization is seeded per plan, dedup compares rows with the same class set only, and images, splits and
augmented variants are cached. The caches make it incremental (only the new rows are realised, embedded,
sent to an LLM). A guard compares every release row before and after; if any changed (the new class put
facts on images the run did not have, which moves the split), the addition is rolled back: the run folder
is restored from a hard-link snapshot taken before, so every file is as it was.
"""

from __future__ import annotations

import logging
from pathlib import Path

from prefect import flow

from flows.build_release import build_release
from flows.run_state import drop_snapshot, recorded_config, restore_run, run_lock, snapshot_run
from generate.plans import class_additions, write_class_additions
from kvqa.catalog import load_catalog
from kvqa.config import load_config
from kvqa.errors import BadInput
from kvqa.tables import read_table
from publish.release import release_row_digests

log = logging.getLogger("kvqa")


class AddClassError(BadInput):
    """The class cannot be added to this run (unknown, already there, run not built, or rows would change)."""


def resolve_run(run: str, output_root: str | None) -> Path:
    """A run folder given as a path, or as a run name under `output_root` (default ./runs)."""
    candidates = [Path(run), Path(output_root or "runs") / run]
    for c in candidates:
        if (c / "stages" / "facts.parquet").is_file():
            return c.resolve()
    raise AddClassError(f"no built run at {' or '.join(map(str, candidates))} (run `kvqa build` first)")


def check_addition(name: str, run: str, config_path: str | None, output_root: str | None) -> tuple[Path, Path]:
    """(run folder, config file) when `name` can be added to `run`; AddClassError saying why not otherwise.

    The CLI calls this before Prefect starts, so the usual mistakes are one readable line.
    """
    run_dir = resolve_run(run, output_root)
    config = Path(config_path) if config_path else recorded_config(run_dir)
    if config is None or not config.is_file():
        raise AddClassError(f"{run_dir} does not record its config file ({config}); pass --config")
    cfg = load_config(config, {"output_root": str(run_dir.parent)})
    if cfg.run_name != run_dir.name:
        raise AddClassError(f"config {config} builds run {cfg.run_name!r}, not {run_dir.name!r}")
    if name not in load_catalog(cfg.catalog).classes:
        raise AddClassError(f"class {name!r} is not in the catalog {cfg.catalog}: add its entry first")
    facts = read_table(run_dir / "stages" / "facts.parquet")
    if name in class_additions(run_dir) or name in set(facts["question_class"]):
        raise AddClassError(f"class {name!r} is already in run {run_dir.name}")
    return run_dir, config


@flow(name="add_question_class", log_prints=True)
def add_question_class(name: str, run: str, config_path: str | None = None, output_root: str | None = None) -> dict:
    """Add the catalog class `name` to the built run `run`; return what was added."""
    run_dir, config = check_addition(name, run, config_path, output_root)
    with run_lock(run_dir, "add_question_class"):
        before_additions = class_additions(run_dir)
        facts = read_table(run_dir / "stages" / "facts.parquet")
        before = release_row_digests(run_dir / "release")
        old_images = set(zip(facts["source"], facts["img_id"]))
        snap = snapshot_run(run_dir)
        write_class_additions(run_dir, (*before_additions, name))
        try:
            report = build_release(str(config), str(run_dir.parent))
            after = release_row_digests(run_dir / "release")
        except BaseException:
            restore_run(run_dir, snap)
            raise
        changed = sorted(q for q, d in before.items() if after.get(q) != d)
        if changed:
            new_facts = read_table(run_dir / "stages" / "facts.parquet")
            new_images = set(zip(new_facts["source"], new_facts["img_id"])) - old_images
            restore_run(run_dir, snap)  # every file back as it was, byte for byte
            raise AddClassError(f"adding {name!r} would change {len(changed)} existing rows (e.g. {changed[:3]}); "
                                f"it brings {len(new_images)} images the run did not have, which moves the split. "
                                "Rolled back (the run folder is as it was); rebuild the run from scratch with the "
                                "class in the catalog instead, or remove its entry before the next build of this run.")
        drop_snapshot(snap)
        qa = read_table(run_dir / "stages" / "qa_dedup.parquet")
        new_rows = qa[qa["question_class"].map(lambda c: name in c)]
        added = {"class": name, "run": run_dir.name, "release_rows_before": len(before), "release_rows_after": len(after),
                 "rows_added_per_level": {int(k): int(v) for k, v in new_rows["complexity"].value_counts().sort_index().items()},
                 "facts_added": int((read_table(run_dir / "stages" / "facts.parquet")["question_class"] == name).sum())}
        log.info("added %s to %s: %d facts, release rows %d -> %d, existing rows unchanged", name, run_dir.name,
                 added["facts_added"], len(before), len(after))
        return {**added, "report": report}
