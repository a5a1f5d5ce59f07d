"""Expert review round trip: export a stratified review sheet from a built run; import the filled sheet.

`import_review` records the verdicts in the run (`review/verdicts.parquet`) and runs the build flow again:
every stage is cached except those whose key holds the verdicts (release, export) and those downstream of
them (card, report), so the release is rewritten by the same code that wrote it, without the rows judged
`wrong`. A guard compares every release row before and after (row digests with image bytes and split):
only the newly rejected rows may disappear, every other row must be byte-identical; otherwise the run
folder is restored from a hard-link snapshot and nothing is applied.
"""

from __future__ import annotations

import logging
from pathlib import Path

from prefect import flow

from flows.add_class import resolve_run
from flows.build_release import build_release
from flows.run_state import drop_snapshot, recorded_config, restore_run, run_lock, snapshot_run
from kvqa.config import load_config
from kvqa.errors import BadInput
from kvqa.tables import read_table
from publish.release import release_row_digests
from review import (current_verdicts, load_verdicts, merge_verdicts, read_filled_sheet, record_verdicts,
                    reviewable_rows, stratified_sample, write_review_sheet)

log = logging.getLogger("kvqa")


class ReviewError(BadInput):
    """The run cannot be reviewed (not built, no recorded config) or the import would change other rows."""


def _run_tables(run_dir: Path):
    if not (run_dir / "stages" / "splits.parquet").is_file() or not (run_dir / "release" / "README.md").is_file():
        raise ReviewError(f"run {run_dir.name} has no release yet ({run_dir}): run `kvqa build` first")
    return (read_table(run_dir / f"stages/{name}.parquet") for name in ("qa_dedup", "splits", "images"))


def review_config(run_dir: Path) -> Path:
    """The config the run was built from (the import rebuilds the release with it)."""
    config = recorded_config(run_dir)
    if config is None or not config.is_file():
        raise ReviewError(f"{run_dir} does not record its config file ({config}); rebuild it with `kvqa build`")
    if load_config(config, {"output_root": str(run_dir.parent)}).run_name != run_dir.name:
        raise ReviewError(f"config {config} builds another run than {run_dir.name!r}")
    return config


def export_review(run: str, n: int, seed: int, output_root: str | None = None) -> dict:
    """Write the review sheet of `n` release rows without a verdict into `<run>/review/sheet-n<N>-seed<S>/`."""
    run_dir = resolve_run(run, output_root)
    with run_lock(run_dir, "kvqa review export"):
        qa, splits, images = _run_tables(run_dir)
        explained = run_dir / "stages" / "explanations.parquet"  # the sheet shows a row's explanation if it has one
        if explained.is_file():
            qa = qa.merge(read_table(explained)[["qa_id", "explanation"]], on="qa_id", how="left")
            qa = qa.fillna({"explanation": ""})
        sample = stratified_sample(reviewable_rows(qa, splits, images, load_verdicts(run_dir)), n, seed)
        out = run_dir / "review" / f"sheet-n{n}-seed{seed}"
        written = write_review_sheet(sample, out, f"Expert review of run {run_dir.name}: {len(sample)} rows "
                                                  f"(seed {seed})")
    log.info("review sheet of %d rows (%d strata) written to %s", len(sample), sample["stratum"].nunique(), out)
    return {"folder": str(out), "rows": len(sample), "strata": int(sample["stratum"].nunique()), "files": written}


def check_import(sheet: str, run: str, output_root: str | None) -> tuple[Path, Path, object]:
    """(run folder, its config, the sheet's verdicts); ReviewSheetError / ReviewError before anything is
    written. Known ids are the rows the release stage selects, judged or not, so a sheet can be imported
    again (a verdict changed from wrong to ok brings its row back)."""
    run_dir = resolve_run(run, output_root)
    config = review_config(run_dir)
    qa, splits, images = _run_tables(run_dir)
    rows = reviewable_rows(qa, splits, images)
    return run_dir, config, read_filled_sheet(Path(sheet), dict(zip(rows["qa_id"], rows["row_digest"])))


@flow(name="review_import", log_prints=True)
def import_review(sheet: str, run: str, output_root: str | None = None) -> dict:
    """Record a filled sheet's verdicts in `run` and rebuild its release without the rows judged wrong."""
    run_dir, config, new = check_import(sheet, run, output_root)
    with run_lock(run_dir, "review_import"):
        recorded = load_verdicts(run_dir)
        merged = merge_verdicts(recorded, new)
        qa, _, images = _run_tables(run_dir)
        wrong_before, wrong_after = (set(v.loc[v["verdict"] == "wrong", "qa_id"])
                                     for v in (current_verdicts(recorded, qa, images)[0],
                                               current_verdicts(merged, qa, images)[0]))
        before = release_row_digests(run_dir / "release")
        snap = snapshot_run(run_dir)
        try:
            record_verdicts(run_dir, merged)
            report = build_release(str(config), str(run_dir.parent))
            after = release_row_digests(run_dir / "release")
        except BaseException:
            restore_run(run_dir, snap)
            raise
        changed = sorted(q for q in set(before) & set(after) if before[q] != after[q])
        removed, returned = set(before) - set(after), set(after) - set(before)
        if changed or removed != (wrong_after - wrong_before) & set(before) or returned - wrong_before:
            restore_run(run_dir, snap)
            raise ReviewError(f"importing {sheet} would change {len(changed)} other release rows (e.g. {changed[:3]}); "
                              "rolled back, nothing applied")
        drop_snapshot(snap)
    counts = new["verdict"].value_counts().to_dict()
    void = len(current_verdicts(new, qa, images)[1])
    if void:
        log.warning("review: %d of the sheet's verdicts are void: their rows changed since the sheet was exported "
                    "(the next `kvqa review export` offers them again)", void)
    log.info("review: %d verdicts recorded in %s, release rows %d -> %d", len(new), run_dir.name, len(before),
             len(after))
    return {"run": run_dir.name, "verdicts": {v: int(counts.get(v, 0)) for v in ("ok", "wrong", "unclear")},
            "void": void,
            "release_rows_before": len(before), "release_rows_after": len(after), "removed": sorted(removed),
            "report": report}
