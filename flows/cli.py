"""`kvqa` command line: build a release, publish it, regenerate the embedded sample."""

from __future__ import annotations

import csv
import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
import yaml

import flows  # noqa: F401  (sets Prefect's offline, quiet defaults before prefect is imported)
from flows.run_state import run_lock
from flows.supervise import supervise
from kvqa.errors import (EXIT_BAD_INPUT, EXIT_PENDING, EXIT_REJECTED, BadInput, ConfigError, RunRejected,
                         StageFailed, one_line, validation_summary, yaml_problem)

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Regenerate a Kvasir-VQA-x1-style GI-endoscopy VQA dataset from source labels.")


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    # One INFO line per HTTP request otherwise (1,940 under the progress bar of one LLM build): the openai
    # client sends through httpx2 / httpcore2, other libraries through httpx / httpcore.
    for noisy in ("httpx", "httpcore", "httpx2", "httpcore2", "faiss.loader"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Prefect's temporary server (a subprocess) is stopped when the command exits, sometimes in the middle
    # of a database call, and then logs sqlalchemy's "Exception during reset" with a CancelledError
    # traceback after our last line. Only that process reads this: ours has a root handler (above), and
    # Prefect leaves a root logger with handlers alone.
    os.environ.setdefault("PREFECT_LOGGING_ROOT_LEVEL", "CRITICAL")


CONFIG_HELP = "run config YAML (default: the embedded sample)"


@app.command()
def build(config: Optional[Path] = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
          output_root: Optional[Path] = typer.Option(None, help="folder for run folders (default: ./runs)")) -> None:
    """Build a Hub-ready release folder from source labels and images."""
    supervise()
    _logging()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with reported_errors():
        cfg = _checked_config(config, output_root)
        from flows.build_release import build_release

        with run_lock(cfg.run_dir, "kvqa build"):  # taken before Prefect starts: a busy run fails at once
            report = build_release(str(config) if config else None, str(output_root) if output_root else None)
    typer.echo(summarise(report))


def _checked_config(config: Optional[Path], output_root: Optional[Path], inputs: bool = True):
    """Load the config, or raise BadInput in one line before Prefect starts: a config or catalog that
    does not load or validate, an input path that is missing or of the wrong kind, an output folder that
    is a file, and (`inputs`) a label file its reader cannot read at all."""
    from kvqa.config import load_config, path_problems

    cfg = load_config(config, {"output_root": str(output_root)} if output_root else None)
    problems = path_problems(cfg) if inputs else []
    if problems:
        raise BadInput("; ".join(problems))
    catalog = _load_catalog(cfg.catalog)
    if inputs:
        _read_labels(cfg, catalog)
    if cfg.explain.enabled:
        from explain import load_phrasings

        load_phrasings(cfg.explain.phrasings, catalog)  # ConfigError naming the file, before Prefect starts
    from augment import CatalogError, load_artifact_catalog  # last: importing it takes seconds (torch)

    try:
        load_artifact_catalog(cfg.augment.catalog)
    except (CatalogError, OSError, yaml.YAMLError) as err:
        raise ConfigError(_describe_load_error("artifact catalog", cfg.augment.catalog, err)) from err
    return cfg


def _load_catalog(path: Path):
    """The question-class catalog, or ConfigError naming it (missing, not YAML, not a mapping, invalid)."""
    from pydantic import ValidationError

    from kvqa.catalog import load_catalog

    try:
        return load_catalog(path)
    except (OSError, yaml.YAMLError, ValidationError, ValueError) as err:
        raise ConfigError(_describe_load_error("catalog", path, err)) from err


def _describe_load_error(what: str, path: Path, err: Exception) -> str:
    from pydantic import ValidationError

    if isinstance(err, FileNotFoundError):
        return f"{what} not found: {path}"
    if isinstance(err, IsADirectoryError):
        return f"{what} {path} is a folder, not a YAML file"
    if isinstance(err, yaml.YAMLError):
        return yaml_problem(path, err)
    if isinstance(err.__cause__, ValidationError):  # e.g. CatalogError wrapping pydantic's many lines
        err = err.__cause__
    if isinstance(err, ValidationError):
        return f"{what} {path}: {validation_summary(err)}"
    text = one_line(str(err))
    return text if str(path) in text else f"{what} {path}: {text}"


def _read_labels(cfg, catalog) -> None:
    """Read every source's label files through the real readers, so a label file that cannot be read
    at all (empty, binary, wrong header, not UTF-8, a field over the CSV limit, bad JSON) is one line
    naming it before Prefect starts. Rows a reader can quarantine stay the run's business. The price is
    one more parse per command, also when the run's `sources` stage is cached: the real HyperKvasir
    files (10,662 label rows, 1,071 boxes) took 1.5-3.0 s, Kvasir-Instrument 0.2-0.5 s, the 1,814-row
    Kvasir-VQA slice 0.13-0.3 s (best of 3-5 runs, on 2 cores shared with other jobs)."""
    from sources import read_sources

    for src in cfg.sources:
        try:
            read_sources([src], catalog)
        except (ValueError, OSError, csv.Error) as err:
            raise BadInput(_naming_the_file(err, src)) from err


def _naming_the_file(err: Exception, src) -> str:
    """The reader's message in one line, prefixed with the label file(s) when it does not name one."""
    text = one_line(str(err))
    named = getattr(err, "filename", None)
    if named and str(named) not in text:
        return f"{named}: {text}"
    files = [str(p) for p in src.label_files]
    if any(f in text for f in files):
        return text
    if isinstance(err, UnicodeDecodeError):
        text = f"not UTF-8 text (byte 0x{err.object[err.start]:02x})"
    elif isinstance(err, csv.Error):
        text = f"csv.Error: {text}"
    elif type(err).__module__ != "builtins":
        text = f"{type(err).__module__}.{type(err).__name__}: {text}"
    return f"{', '.join(files)} (source {src.name}): {text}"


def exit_for(err: BaseException) -> tuple[int, str] | None:
    """(exit code, the one line to print) for the ways a run ends on purpose; None for anything else,
    which is a bug and keeps its traceback. Codes: see kvqa/errors.py."""
    # only a loaded module can have raised its BatchPending (and importing it takes seconds)
    batch_backend = sys.modules.get("generate.batch_backend")
    if batch_backend is not None and isinstance(err, batch_backend.BatchPending):
        return EXIT_PENDING, f"waiting for batch results: {err}"
    if isinstance(err, RunRejected):
        return EXIT_REJECTED, f"error: run rejected: {one_line(str(err))}"
    # OSError: an I/O failure no stage wrapped in StageFailed is still one line, only without the stage
    if isinstance(err, (BadInput, StageFailed, OSError)):
        return EXIT_BAD_INPUT, f"error: {one_line(str(err))}"
    return None


@contextmanager
def reported_errors():
    """Every command runs inside this: a known failure is one line on stderr and its exit code.

    Prefect logs a failed task or flow run with its traceback before the exception reaches us; for the
    failures mapped here that traceback says nothing the line does not, so those records are dropped.
    """
    quiet = _KnownFailureFilter()
    loggers = [logging.getLogger(name) for name in ("prefect.flow_runs", "prefect.task_runs")]
    for logger in loggers:
        logger.addFilter(quiet)
    try:
        yield
    except Exception as err:
        mapped = exit_for(err)
        if mapped is None:
            raise
        code, line = mapped
        typer.echo(line, err=True)
        raise typer.Exit(code)
    finally:
        for logger in loggers:
            logger.removeFilter(quiet)


class _KnownFailureFilter(logging.Filter):
    """Drops Prefect's records of an exception `exit_for` maps, and its "Finished in state Failed(...)"
    line that repeats it."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and exit_for(exc) is not None:
            self.seen.add(f"{type(exc).__name__}: {exc}")
            return False
        message = record.getMessage()
        return not any(known in message for known in self.seen)


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
    e = report.get("explain", {})
    if e.get("enabled"):
        lines.append(f"  explanations: {e['explained']:,} rows ({e['with_boxes']:,} with source boxes, {e['with_masks']:,} "
                     f"with masks, {e['rejected']:,} rejected); release config `explanations` rows "
                     + ", ".join(f"{k} {v:,}" for k, v in report["release"].get("explanation_rows", {}).items()))
    if report.get("review"):
        r = report["review"][0]
        lines.append(f"  expert review: {r['reviewed']:,} rows judged, {r['wrong']:,} wrong (quarantined), error rate "
                     f"{100 * (r['error_rate'] or 0):.1f} % (95 % interval {100 * r['ci_low']:.1f}-{100 * r['ci_high']:.1f} %)")
    if report.get("quality_report"):
        lines.append(f"  quality report: {report['run_dir']}/{report['quality_report']['page']}")
    if report["quarantine"]["total"]:
        lines.append("  quarantined: " + ", ".join(f"{k} {v:,}" for k, v in
                                                    report["quarantine"]["by_stage_reason"].items())
                     + f" (see {report['run_dir']}/quarantine.parquet)")
    return "\n".join(lines)


@app.command()
def augment(config: Optional[Path] = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
            output_root: Optional[Path] = typer.Option(None, help="folder for run folders (default: ./runs)")) -> None:
    """Make (or complete) only the augmented track of a run: ten weak imaging artifacts per image."""
    supervise()
    _logging()
    with reported_errors():
        cfg = _checked_config(config, output_root)
        from flows.augment_track import augment_track

        with run_lock(cfg.run_dir, "kvqa augment"):
            summary = augment_track(str(config) if config else None, str(output_root) if output_root else None)
    typer.echo(f"run {cfg.run_name}: {summary['variants']:,} variants of {summary['augmented_images']:,} images "
               f"in {cfg.run_dir / 'augmented'} ({summary['quarantined']} images quarantined); "
               f"contact sheet {cfg.run_dir / str(summary['contact_sheet'])}")


@app.command("add-class")
def add_class(name: str = typer.Argument(..., help="the catalog class to add (its entry must be in the catalog)"),
              run: str = typer.Option(..., "--run", help="run name (under --output-root) or run folder"),
              config: Optional[Path] = typer.Option(None, "--config", "-c",
                                                    help="run config (default: the one the run was built from)"),
              output_root: Optional[Path] = typer.Option(None, help="folder for run folders (default: ./runs)")) -> None:
    """Add a new question class's pairs to a built run; existing rows stay byte-identical."""
    supervise()
    _logging()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from flows.add_class import add_question_class, check_addition

    with reported_errors():  # AddClassError is a BadInput: one line, exit 2
        run_dir, run_config = check_addition(name, run, str(config) if config else None,
                                             str(output_root) if output_root else None)
        _checked_config(run_config, run_dir.parent)
        with run_lock(run_dir, f"kvqa add-class {name}"):
            added = add_question_class(name, run, str(config) if config else None,
                                       str(output_root) if output_root else None)
    levels = ", ".join(f"level {k}: {v:,}" for k, v in added["rows_added_per_level"].items())
    typer.echo(f"added {name} to run {added['run']}: {added['facts_added']:,} facts, {levels}; release rows "
               f"{added['release_rows_before']:,} -> {added['release_rows_after']:,} (existing rows unchanged)\n"
               + summarise(added["report"]))


@app.command()
def publish(repo_id: str = typer.Option(..., "--repo-id", help="ORG/NAME of the Hub dataset repo"),
            config: Optional[Path] = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
            output_root: Optional[Path] = typer.Option(None),
            private: bool = typer.Option(False, help="create the repo as private"),
            endpoint: Optional[str] = typer.Option(None, help="Hub endpoint (default: huggingface.co)")) -> None:
    """Upload a built release folder to the Hub (token from HF_TOKEN)."""
    _logging()
    from publish import upload_release
    from publish.hub import MissingTokenError

    with reported_errors():
        cfg = _checked_config(config, output_root, inputs=False)
        release = cfg.run_dir / "release"
        if not (release / "README.md").is_file():
            raise BadInput(f"no release at {release}: run kvqa build with this config first")
        try:
            url = upload_release(release, repo_id, private=private, endpoint=endpoint)
        except MissingTokenError as err:
            raise BadInput(str(err)) from err
    typer.echo(f"published {release} to {repo_id}: {url}")


llm_app = typer.Typer(no_args_is_help=True, help="A real LLM server on this machine's CPU (the packaged "
                                                  "SmolLM2-135M-Instruct, vLLM or llama.cpp) for trying the LLM backends.")
app.add_typer(llm_app, name="llm-server")
ENGINE_HELP = "vllm, llama-cpp, or auto (vLLM, else llama.cpp where vLLM cannot run on this CPU)"


@contextmanager
def _llm_server_errors():
    from subprocess import CalledProcessError

    from kvqa.llm_server import LLMServerError

    try:
        yield
    except (LLMServerError, CalledProcessError) as err:
        typer.echo(f"error: {one_line(str(err))}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT)


@llm_app.command("install")
def llm_server_install(engine: str = typer.Option("auto", help=ENGINE_HELP)) -> None:
    """Create the LLM venv (.venv-llm, or $KVQA_LLM_VENV) with the server and the packaged model."""
    _logging()
    from kvqa import llm_server

    with _llm_server_errors():
        llm_server.install(engine)
    typer.echo(f"{llm_server.which_engine_installed()} installed in {llm_server.VENV}")


@llm_app.command("start")
def llm_server_start(port: int = typer.Option(8100, help="port on 127.0.0.1"),
                     engine: str = typer.Option("auto", help=ENGINE_HELP),
                     compile_model: bool = typer.Option(True, "--compile/--no-compile",
                                                        help="vLLM: torch.compile the model (~60 s more start)")
                     ) -> None:
    """Start the server (in the background), wait until it serves the model, print its base_url."""
    _logging()
    from kvqa import llm_server

    with _llm_server_errors():
        state = llm_server.start(port, engine, compile_model=compile_model)
    typer.echo(f"{state.engine} serving model {state.model} at base_url {state.base_url} "
               f"(stop: kvqa llm-server stop; log {state.log_file})")
    typer.echo(state.base_url)


@llm_app.command("stop")
def llm_server_stop() -> None:
    """Stop the server `start` left running, with every process it started."""
    from kvqa import llm_server

    typer.echo("stopped" if llm_server.stop() else "no server was running")


@llm_app.command("status")
def llm_server_status() -> None:
    """The running server's base_url, or exit 1 when none is running and ready."""
    from kvqa import llm_server

    state = llm_server.running()
    if state is None or not llm_server.ready(state.base_url):
        typer.echo("no server running")
        raise typer.Exit(EXIT_REJECTED)
    typer.echo(f"{state.engine} serving {state.model} at {state.base_url}")


export_app = typer.Typer(no_args_is_help=True, help="Write a built run's files for downstream tools.")
app.add_typer(export_app, name="export")


@export_app.command("medico-task2")
def export_medico_task2(run: str = typer.Option(..., "--run", help="run name (under --output-root) or run folder"),
                        output_root: Optional[Path] = typer.Option(None, help="folder for run folders (default: ./runs)")
                        ) -> None:
    """Medico 2026 subtask 2: the validation subset as the task page builds it, on this run's release, and a
    reference submission (submission_task2.jsonl + visuals/) from the labels."""
    _logging()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with reported_errors():
        from flows.add_class import resolve_run
        from flows.medico_task2 import export_medico_task2 as export

        run_dir = resolve_run(run, str(output_root) if output_root else None)
        with run_lock(run_dir, "kvqa export medico-task2"):
            summary = export(run_dir)
    typer.echo(f"run {run_dir.name}: {summary['val_rows']:,} validation rows ({summary['with_boxes']:,} with boxes, "
               f"{summary['with_masks']:,} with masks) in {run_dir / summary['folder']}: "
               f"{run_dir / summary['val_set']}, {run_dir / summary['submission']}")


@app.command("validate-task2")
def validate_task2(file: Path = typer.Argument(..., help="submission_task2.jsonl"),
                   val_set: Optional[Path] = typer.Option(
                       None, "--val-set", help="saved validation subset (default: val_set_task2/ beside FILE)")) -> None:
    """Check a Medico subtask-2 submission against the task page's field rules: one line per problem,
    `file:line: what`, exit 1 on any."""
    with reported_errors():
        from explain.medico import VAL_SET_NAME, load_val_set, submission_problems

        folder = val_set or (file.parent / VAL_SET_NAME)
        rows = load_val_set(folder) if (val_set or folder.is_dir()) else None
        problems = submission_problems(file, rows)
    for line in problems:
        typer.echo(line)
    if problems:
        typer.echo(f"{file}: {len(problems)} problem(s)", err=True)
        raise typer.Exit(EXIT_REJECTED)
    against = f"the {len(rows):,}-row validation set {folder}" if rows is not None else \
        "the field rules only (no validation set: img_id/question not matched)"
    typer.echo(f"{file}: valid against {against}")
review_app = typer.Typer(no_args_is_help=True, help="Expert review: export a review sheet, import the verdicts.")
app.add_typer(review_app, name="review")
RUN_HELP = "run name (under --output-root) or run folder"


@review_app.command("export")
def review_export(run: str = typer.Option(..., "--run", help=RUN_HELP),
                  n: int = typer.Option(..., "--n", min=1, help="rows to sample"),
                  seed: int = typer.Option(0, "--seed", help="sampling seed (same seed, same sheet)"),
                  output_root: Optional[Path] = typer.Option(None, help="folder for run folders (default: ./runs)")) -> None:
    """Write a review sheet (HTML, CSV, Label Studio JSON) of N release rows, stratified by class x complexity."""
    _logging()
    from flows.expert_review import export_review

    with reported_errors():
        out = export_review(run, n, seed, str(output_root) if output_root else None)
    typer.echo(f"review sheet of {out['rows']:,} rows ({out['strata']} class x complexity strata) in {out['folder']}: "
               "open sheet.html, fill verdict (ok/wrong/unclear) and comment in sheet.csv, then "
               f"`kvqa review import --run {run} {out['folder']}/sheet.csv`")


@review_app.command("import")
def review_import(sheet: Path = typer.Argument(..., help="the filled sheet.csv"),
                  run: str = typer.Option(..., "--run", help=RUN_HELP),
                  output_root: Optional[Path] = typer.Option(None, help="folder for run folders (default: ./runs)")) -> None:
    """Record a filled review sheet's verdicts and rebuild the release without the rows judged wrong."""
    supervise()
    _logging()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from flows.expert_review import check_import, import_review

    with reported_errors():  # a bad sheet is BadInput: `file:line: what` lines, exit 2, nothing applied
        run_dir, _, _ = check_import(str(sheet), run, str(output_root) if output_root else None)
        with run_lock(run_dir, "kvqa review import"):
            done = import_review(str(sheet), run, str(output_root) if output_root else None)
    v = done["verdicts"]
    typer.echo(f"review of run {done['run']}: {v['ok']:,} ok, {v['wrong']:,} wrong, {v['unclear']:,} unclear recorded; "
               f"release rows {done['release_rows_before']:,} -> {done['release_rows_after']:,} (other rows unchanged)\n"
               + summarise(done["report"]))


@app.command("make-sample")
def make_sample(out: Optional[Path] = typer.Option(None, help="output folder (default: data/sample)"),
                seed: int = typer.Option(2026)) -> None:
    """Regenerate the embedded synthetic sample (deterministic)."""
    from data.make_sample import SAMPLE_DIR, write_sample

    typer.echo(f"wrote {write_sample(out or SAMPLE_DIR, seed)}")


if __name__ == "__main__":
    app()
