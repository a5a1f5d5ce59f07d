"""`kvqa` command line: build a release, publish it, regenerate the embedded sample."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import typer

import flows  # noqa: F401  (sets Prefect's offline, quiet defaults before prefect is imported)
from flows.supervise import supervise

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Regenerate a Kvasir-VQA-x1-style GI-endoscopy VQA dataset from source labels.")


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("httpx", "httpcore", "faiss.loader"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@app.command()
def build(config: Optional[Path] = typer.Option(None, "--config", "-c", exists=True, dir_okay=False,
                                                help="run config YAML (default: the embedded sample)"),
          output_root: Optional[Path] = typer.Option(None, help="folder for run folders (default: ./runs)")) -> None:
    """Build a Hub-ready release folder from source labels and images."""
    supervise()
    _logging()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from flows.build_release import build_release
    from generate.batch_backend import BatchPending

    _checked_config(config, output_root)
    try:
        report = build_release(str(config) if config else None, str(output_root) if output_root else None)
    except BatchPending as pending:
        typer.echo(f"waiting for batch results: {pending}", err=True)
        raise typer.Exit(3)
    typer.echo(summarise(report))


def _checked_config(config: Optional[Path], output_root: Optional[Path]):
    """Load the config, or fail in one readable line before Prefect starts (bad value, missing input)."""
    from pydantic import ValidationError

    from augment import CatalogError, load_artifact_catalog
    from kvqa.config import load_config
    from kvqa.redact import validation_message

    try:
        cfg = load_config(config, {"output_root": str(output_root)} if output_root else None)
        load_artifact_catalog(cfg.augment.catalog)
    except (ValidationError, ValueError, CatalogError, OSError) as err:
        # Not pydantic's own text: it echoes the failing input, credentials included.
        fail(f"invalid config {config or '(embedded sample)'}:\n{validation_message(err)}")
    missing = [str(p) for s in cfg.sources for p in (*s.label_files, s.image_dir) if not p.exists()]
    if missing:
        fail(f"input not found: {', '.join(missing)}")
    return cfg


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def summarise(report: dict) -> str:
    """What a person wants after a build: where the release is and what went in, out and why."""
    s, g, d = report["sources"], report["generate"], report["dedup"]
    rows = report["release"]["rows"]
    lines = [f"run {report['run_name']}: release in {report['release_dir']}",
             f"  label rows and boxes {s['rows_read']:,} -> facts {s['facts']:,} ({s['quarantined']:,} quarantined)",
             f"  plans {report['plans']['plans']:,} -> QA {g['qa']:,} ({g['rejected']:,} rejected)"
             + (f" -> after dedup {d['rows_kept']:,} ({d['rows_removed']:,} duplicates)" if "rows_kept" in d else ""),
             f"  images {report['images']['usable']:,} usable, {report['images']['quarantined']:,} quarantined",
             "  release rows: " + ", ".join(f"{k} {v:,}" for k, v in rows.items())]
    a = report.get("augment", {})
    if a.get("variants"):
        lines.append(f"  augmented track: {a['variants']:,} variants of {a['augmented_images']:,} images "
                     f"({len(a['artifacts'])} artifacts), release rows "
                     + ", ".join(f"{k} {v:,}" for k, v in report["release"]["augmented_rows"].items())
                     + f"; contact sheet {report['run_dir']}/{a['contact_sheet']}")
    if report["quarantine"]["total"]:
        lines.append("  quarantined: " + ", ".join(f"{k} {v:,}" for k, v in
                                                    report["quarantine"]["by_stage_reason"].items())
                     + f" (see {report['run_dir']}/quarantine.parquet)")
    return "\n".join(lines)


@app.command()
def augment(config: Optional[Path] = typer.Option(None, "--config", "-c", exists=True, dir_okay=False,
                                                  help="run config YAML (default: the embedded sample)"),
            output_root: Optional[Path] = typer.Option(None, help="folder for run folders (default: ./runs)")) -> None:
    """Make (or complete) only the augmented track of a run: ten weak imaging artifacts per image."""
    supervise()
    _logging()
    from flows.augment_track import augment_track

    cfg = _checked_config(config, output_root)
    summary = augment_track(str(config) if config else None, str(output_root) if output_root else None)
    typer.echo(f"run {cfg.run_name}: {summary['variants']:,} variants of {summary['augmented_images']:,} images "
               f"in {cfg.run_dir / 'augmented'} ({summary['quarantined']} images quarantined); "
               f"contact sheet {cfg.run_dir / str(summary['contact_sheet'])}")


@app.command("add-class")
def add_class(name: str = typer.Argument(..., help="the catalog class to add (its entry must be in the catalog)"),
              run: str = typer.Option(..., "--run", help="run name (under --output-root) or run folder"),
              config: Optional[Path] = typer.Option(None, "--config", "-c", exists=True, dir_okay=False,
                                                    help="run config (default: the one the run was built from)"),
              output_root: Optional[Path] = typer.Option(None, help="folder for run folders (default: ./runs)")) -> None:
    """Add a new question class's pairs to a built run; existing rows stay byte-identical."""
    supervise()
    _logging()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from flows.add_class import AddClassError, add_question_class, check_addition

    try:
        check_addition(name, run, str(config) if config else None, str(output_root) if output_root else None)
        added = add_question_class(name, run, str(config) if config else None,
                                   str(output_root) if output_root else None)
    except AddClassError as err:
        fail(str(err))
    levels = ", ".join(f"level {k}: {v:,}" for k, v in added["rows_added_per_level"].items())
    typer.echo(f"added {name} to run {added['run']}: {added['facts_added']:,} facts, {levels}; release rows "
               f"{added['release_rows_before']:,} -> {added['release_rows_after']:,} (existing rows unchanged)\n"
               + summarise(added["report"]))


@app.command()
def publish(repo_id: str = typer.Option(..., "--repo-id", help="ORG/NAME of the Hub dataset repo"),
            config: Optional[Path] = typer.Option(None, "--config", "-c", exists=True, dir_okay=False),
            output_root: Optional[Path] = typer.Option(None),
            private: bool = typer.Option(False, help="create the repo as private"),
            endpoint: Optional[str] = typer.Option(None, help="Hub endpoint (default: huggingface.co)")) -> None:
    """Upload a built release folder to the Hub (token from HF_TOKEN)."""
    _logging()
    from kvqa.config import load_config
    from publish import upload_release

    cfg = load_config(config, {"output_root": str(output_root)} if output_root else None)
    url = upload_release(cfg.run_dir / "release", repo_id, private=private, endpoint=endpoint)
    typer.echo(f"published {cfg.run_dir / 'release'} to {repo_id}: {url}")


@app.command("make-sample")
def make_sample(out: Optional[Path] = typer.Option(None, help="output folder (default: data/sample)"),
                seed: int = typer.Option(2026)) -> None:
    """Regenerate the embedded synthetic sample (deterministic)."""
    from data.make_sample import SAMPLE_DIR, write_sample

    typer.echo(f"wrote {write_sample(out or SAMPLE_DIR, seed)}")


if __name__ == "__main__":
    app()
