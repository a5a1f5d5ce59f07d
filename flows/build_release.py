"""The `build_release` Prefect flow: source labels -> facts -> plans -> QA -> images -> splits -> release.

The flow is the list of stages below, in order, plus orchestration: the run lock, the augment sub-flow, the
run rejections after generate and explain, and `report.json`. Every stage is declared and built in its own
package (`kvqa.stage`): each is a Prefect task, skipped on a re-run when nothing its declaration names
changed. Counts and ids are reconciled inside every stage; a mismatch is a bug and stops the run.
"""

from __future__ import annotations

import logging
from pathlib import Path

from prefect import flow

from augment.stages import AUGMENT
from dedup.stages import DEDUP, LEAKAGE
from explain.stages import EXPLAIN
from flows.augment_track import augment_track
from flows.run_state import record_run, run_lock
from flows.steps import run_as_task
from generate.plans import class_additions
from generate.quality import empty_release_problem
from generate.stages import GENERATE, PLANS
from kvqa.config import SAMPLE_CONFIG_PATH, Config, load_config, public_config_yaml
from kvqa.errors import RunRejected
from kvqa.reconcile import QUARANTINE_FILES, write_run_quarantine
from kvqa.tables import write_json
from publish.stages import CARD, EXPORT, RELEASE, RELEASE_EXPLANATIONS, SPLITS
from report.stages import QUARANTINE, REPORT
from sources.stages import IMAGES, SOURCES

log = logging.getLogger("kvqa")

# The release flow, in order. `augment` runs as the `augment_track` sub-flow (`kvqa augment` runs it alone).
RELEASE_STAGES = (SOURCES, PLANS, GENERATE, DEDUP, IMAGES, AUGMENT, SPLITS, LEAKAGE, RELEASE, EXPLAIN,
                  RELEASE_EXPLANATIONS, CARD, EXPORT, QUARANTINE, REPORT)


def reject(problem: str, run_dir: Path, report: dict, quarantine_files: list[str]) -> None:
    """Raise `RunRejected` with `problem` after writing what the run knows: `report.json` and
    `quarantine.parquet` of the stages run so far (`quarantine_files`: theirs only, not a table that a
    previous run of a later stage left)."""
    report["rejected"] = problem
    report["quarantine"] = write_run_quarantine(run_dir, quarantine_files)[1]
    write_json(report, run_dir / "report.json")
    raise RunRejected(problem)


def run_report(cfg: Config, run_dir: Path, summaries: dict) -> dict:
    """`report.json` from the stage summaries so far: the shard listings stay in the stage markers, the
    explanation rows join the release's entry, the expert review's rates (the card's) get their own."""
    report = {"run_name": cfg.run_name, "seed": cfg.seed, "added_classes": list(class_additions(run_dir)),
              **{k: v for k, v in summaries.items() if k not in ("release", "release_explanations", "card", "report")}}
    if "release" in summaries:
        report["release"] = {k: v for k, v in summaries["release"].items() if k not in ("files", "augmented_files")}
    if "release_explanations" in summaries:
        report["release"]["explanation_rows"] = summaries["release_explanations"]["rows"]
    if "card" in summaries:
        report["card"] = {k: v for k, v in summaries["card"].items() if k != "review"}
        if summaries["card"]["review"]:
            report["review"] = summaries["card"]["review"]
    if "report" in summaries:
        report["quality_report"] = summaries["report"]
    return report


@flow(name="build_release", log_prints=True)
def build_release(config_path: str | None = None, output_root: str | None = None) -> dict:
    """Build a Hub-ready release folder in `<output_root>/<run_name>/release` and a run report."""
    overrides = {"output_root": output_root} if output_root else None
    cfg = load_config(config_path, overrides)
    run_dir = Path(cfg.run_dir)
    # The card shows the validated config with credentials redacted and paths relative to its folder; the
    # swift export's image paths are absolute, under the run folder.
    params = {"config_text": public_config_yaml(cfg, Path(config_path or SAMPLE_CONFIG_PATH).resolve().parent),
              "run_dir": str(run_dir)}
    with run_lock(run_dir, "build_release"):
        (run_dir / "stages").mkdir(parents=True, exist_ok=True)
        record_run(run_dir, Path(config_path or SAMPLE_CONFIG_PATH))
        summaries: dict[str, dict] = {}
        for stage in RELEASE_STAGES:
            if stage is AUGMENT:
                summaries[stage.name] = augment_track(config_path, output_root, inputs_ready=True)
            else:
                summaries[stage.name] = run_as_task(stage, cfg, run_dir, summaries, params)
            if stage.rejection and (problem := stage.rejection(cfg, summaries[stage.name])):
                written = {o for s in RELEASE_STAGES[:RELEASE_STAGES.index(stage) + 1] for o in s.outputs}
                reject(problem, run_dir, run_report(cfg, run_dir, summaries),
                       [f for f in QUARANTINE_FILES if f in written])
        report = run_report(cfg, run_dir, summaries)
        write_json(report, run_dir / "report.json")  # no paths or timings: it must be identical across runs
        if problem := empty_release_problem(report["release"]["rows"], report["quarantine"]["by_stage_reason"]):
            raise RunRejected(problem)  # report.json and quarantine.parquet are written
        rows = report["release"]["rows"]
        log.info("release written to %s: %s rows (%s), %d quarantined", run_dir / "release",
                 sum(rows.values()), ", ".join(f"{k} {v}" for k, v in rows.items()), report["quarantine"]["total"])
        return {**report, "run_dir": str(run_dir), "release_dir": str(run_dir / "release")}
