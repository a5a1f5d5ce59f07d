"""The report stage: `report.html` and `report_files/`, the last stage, from the run's tables."""

from __future__ import annotations

from kvqa.reconcile import QUARANTINE_FILES, write_run_quarantine
from kvqa.stage import Stage, StageRun
from report.page import REPORT_INPUTS, write_quality_report
from review import VERDICTS_FILE, error_rates, load_verdicts

# What draws the plots and thumbnails (matplotlib and what it renders with).
PLOT_LIBRARIES = ("matplotlib", "cycler", "fonttools", "kiwisolver", "pyparsing", "contourpy", "pillow")


def shards_and_sheet(run: StageRun) -> list[str]:
    """Every parquet file of the release folder (the report reads the folder as a dataset), and the augment
    stage's contact sheet when it made one."""
    release = run.run_dir / "release"
    sheet = run.summaries["augment"].get("contact_sheet")
    return sorted(str(p.relative_to(run.run_dir)) for p in release.rglob("*.parquet")) + ([sheet] if sheet else [])


def quarantine(run: StageRun) -> tuple[dict, list[str]]:
    """`quarantine.parquet`: every stage's quarantine table as one, and its counts by stage and reason."""
    _, counts = write_run_quarantine(run.run_dir)
    return counts, list(QUARANTINE.outputs)


def report(run: StageRun) -> tuple[dict, list[str]]:
    """The quality report, with the expert review's error rates when verdicts were imported."""
    rates = error_rates(load_verdicts(run.run_dir), run.table("stages/qa_dedup.parquet"),
                        run.table("stages/images.parquet"))
    return write_quality_report(run.run_dir, run.cfg.run_name, run.summaries["dedup"], run.summaries["leakage"],
                                rates, run.summaries["augment"].get("contact_sheet"))


QUARANTINE = Stage("quarantine", quarantine, packages=("report",), tables=tuple(QUARANTINE_FILES),
                   outputs=("quarantine.parquet",))
REPORT = Stage("report", report, packages=("report", "review"), config=("run_name",),
               tables=(*REPORT_INPUTS, VERDICTS_FILE),  # REPORT_INPUTS has the QA rows and images the rates read
               run_inputs=shards_and_sheet, data=("report/kvasir_vqa_x1_reference.yaml",),
               after=("dedup", "leakage", "augment"), libraries=PLOT_LIBRARIES)
