"""Broken and hostile inputs through the real CLI: one readable line and the right exit code, never a
traceback; and a run that produces nothing does not exit 0.

Exit codes (kvqa/errors.py): 0 ok, 1 run rejected, 2 bad input / config / stage failure, 3 batch pending.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from conftest import SAMPLE_DIR, run_cli, tree_digests, write_config


def one_error_line(proc: subprocess.CompletedProcess, code: int) -> str:
    """The only non-empty stderr line, checked to be an `error:` line with exit `code` and no traceback."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def kvasir_config(tmp_path: Path, csv: Path, images: Path | None = None, **extra) -> Path:
    if images is None:
        images = tmp_path / "images"
        images.mkdir(exist_ok=True)
    return write_config(tmp_path / "c.yaml", csv, images, run_name="bad", **extra)


def good_csv(tmp_path: Path) -> Path:
    csv = tmp_path / "metadata.csv"
    csv.write_text("source,question,answer,img_id\nPolyps,Is there text?,yes,img1\n")
    return csv


# --- label files the readers cannot read at all: checked up front, before Prefect ---------------------

def _empty(p: Path) -> None:
    p.write_bytes(b"")


def _binary(p: Path) -> None:
    p.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 8)


def _wrong_header(p: Path) -> None:
    p.write_text("image,label\nimg1,polyp\n")


def _non_utf8_header(p: Path) -> None:  # a bad byte in a data row only quarantines that row (test_sources)
    p.write_bytes(b"source,qu\xe9stion,answer,img_id\nPolyps,Is there text?,yes,img1\n")


def _huge_field(p: Path) -> None:  # over the csv module's 128 KiB field limit
    p.write_text("source,question,answer,img_id\nPolyps,Is there text?," + "y" * 5_000_000 + ",img1\n")


@pytest.mark.parametrize("make", [_empty, _binary, _wrong_header, _non_utf8_header, _huge_field],
                         ids=["empty", "binary", "wrong-header", "non-utf8-header", "5mb-field"])
def test_unreadable_label_file_is_one_line_naming_it(tmp_path, make):
    csv = tmp_path / "metadata.csv"
    make(csv)
    line = one_error_line(run_cli("build", "--config", str(kvasir_config(tmp_path, csv)), check=False), 2)
    assert str(csv) in line


def test_bad_boxes_json_is_one_line_naming_it(tmp_path):
    boxes = tmp_path / "boxes.json"
    boxes.write_text('{"img1": {"height": 10, "width": 10, "bbox": [')
    (tmp_path / "images").mkdir()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"run_name": "bad", "output_root": str(tmp_path / "runs"), "sources": [
        {"kind": "boxes", "name": "inst", "boxes_json": str(boxes), "box_labels": ["instrument"],
         "image_label": "instrument", "image_dir": str(tmp_path / "images")}]}))
    line = one_error_line(run_cli("build", "--config", str(cfg), check=False), 2)
    assert str(boxes) in line


# --- configs, catalogs, paths ----------------------------------------------------------------------------

@pytest.mark.parametrize("text, where", [
    ("run_name: x\nsources: [\n", ":3:1: invalid YAML"),
    ("run_name: x\nplans:\n\tlevel_ratios: {2: 1.0}\n", ":3:1: invalid YAML"),
    ("- run_name: x\n", "not a list"),
    ("just a string\n", "not a str"),
], ids=["syntax", "tab", "list", "scalar"])
def test_bad_config_yaml_is_one_line(tmp_path, text, where):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    line = one_error_line(run_cli("build", "--config", str(cfg), check=False), 2)
    assert f"{cfg}{where}" in line if where.startswith(":") else (str(cfg) in line and where in line)


def test_missing_config_is_one_line(tmp_path):
    line = one_error_line(run_cli("build", "--config", str(tmp_path / "nope.yaml"), check=False), 2)
    assert line == f"error: config not found: {tmp_path / 'nope.yaml'}"


@pytest.mark.parametrize("catalog_text, says", [
    (None, "catalog not found"),
    ("- a\n- b\n", "not a list"),
    ("version: 1\nclasses: [\n", "invalid YAML"),
    ("version: 1\n", "required key missing"),
], ids=["missing", "list", "syntax", "invalid"])
def test_bad_catalog_is_one_line(tmp_path, catalog_text, says):
    catalog = tmp_path / "catalog.yaml"
    if catalog_text is not None:
        catalog.write_text(catalog_text)
    cfg = kvasir_config(tmp_path, good_csv(tmp_path), catalog=str(catalog))
    line = one_error_line(run_cli("build", "--config", str(cfg), check=False), 2)
    assert str(catalog) in line and says in line


def test_bad_artifact_catalog_is_one_line(tmp_path):
    artifacts = tmp_path / "artifacts.yaml"
    artifacts.write_text("base: [\n")
    cfg = kvasir_config(tmp_path, good_csv(tmp_path), augment={"catalog": str(artifacts)})
    line = one_error_line(run_cli("build", "--config", str(cfg), check=False), 2)
    assert line.startswith(f"error: {artifacts}:2:1: invalid YAML")
    artifacts.unlink()
    line = one_error_line(run_cli("build", "--config", str(cfg), check=False), 2)
    assert line == f"error: artifact catalog not found: {artifacts}"


def test_paths_of_the_wrong_kind_are_one_line(tmp_path):
    folder_csv = tmp_path / "metadata-folder"
    folder_csv.mkdir()
    image_file = tmp_path / "images.jpg"
    image_file.write_bytes(b"not a folder")
    root_file = tmp_path / "runs-file"
    root_file.write_text("")
    cfg = write_config(tmp_path / "c.yaml", folder_csv, image_file, run_name="bad")
    line = one_error_line(run_cli("build", "--config", str(cfg), "--output-root", str(root_file), check=False), 2)
    assert f"{folder_csv}: is a folder, not a file (metadata_csv" in line
    assert f"{image_file}: is a file, not a folder (image_dir" in line
    assert f"{root_file}: is a file, not a folder (output_root" in line


@pytest.mark.parametrize("ratio", [1e308, float("inf"), float("nan"), 1e4, -1])
def test_level_ratios_are_bounded(tmp_path, ratio):
    from kvqa.config import load_config
    from kvqa.errors import ConfigError

    cfg = kvasir_config(tmp_path, good_csv(tmp_path), plans={"level_ratios": {2: ratio}})
    with pytest.raises(ConfigError, match=rf"^{cfg}: plans.level_ratios: .*between 0 and 1000"):
        load_config(cfg)


def test_largest_level_ratio_draws_every_combination():
    """The bound loses nothing: at the largest allowed ratio an image gets all its k-combinations."""
    import pandas as pd

    from generate.plans import compose_plans
    from kvqa.config import MAX_LEVEL_RATIO, PlanConfig

    facts = pd.DataFrame({"fact_id": [f"f{i}" for i in range(6)], "source": "s", "img_id": "i",
                          "question_class": [f"c{i}" for i in range(6)]})
    plans = compose_plans(facts, PlanConfig(level_ratios={2: MAX_LEVEL_RATIO, 3: MAX_LEVEL_RATIO}), 42)
    assert plans["complexity"].value_counts().to_dict() == {1: 6, 2: 15, 3: 20}


def test_overflowing_level_ratio_through_the_cli(tmp_path):
    cfg = kvasir_config(tmp_path, good_csv(tmp_path), plans={"level_ratios": {2: 1e308}})
    line = one_error_line(run_cli("build", "--config", str(cfg), check=False), 2)
    assert str(cfg) in line and "level_ratios" in line


def test_augment_and_publish_give_the_same_lines(tmp_path):
    """One code path: the same problem reads the same whatever the command."""
    csv = tmp_path / "metadata.csv"
    _wrong_header(csv)
    cfg = kvasir_config(tmp_path, csv)
    lines = {cmd: one_error_line(run_cli(*args, check=False), 2) for cmd, args in {
        "build": ("build", "-c", str(cfg)), "augment": ("augment", "-c", str(cfg))}.items()}
    assert lines["build"] == lines["augment"] and str(csv) in lines["build"]
    tab = tmp_path / "tab.yaml"
    tab.write_text("run_name: x\n\tseed: 1\n")
    lines = {cmd: one_error_line(run_cli(*args, check=False), 2) for cmd, args in {
        "build": ("build", "-c", str(tab)), "augment": ("augment", "-c", str(tab)),
        "publish": ("publish", "--repo-id", "o/n", "-c", str(tab))}.items()}
    assert len(set(lines.values())) == 1 and f"{tab}:2:1: invalid YAML" in lines["build"]
    line = one_error_line(run_cli("publish", "--repo-id", "o/n", "-c", str(cfg), check=False), 2)
    assert line == f"error: no release at {tmp_path / 'runs' / 'bad' / 'release'}: run kvqa build with this config first"


def test_add_class_shares_the_up_front_checks(tmp_path):
    """add-class re-runs the build from the run's config: a label file broken since is one line too."""
    csv = tmp_path / "metadata.csv"
    _wrong_header(csv)
    cfg = kvasir_config(tmp_path, csv)
    run_dir = tmp_path / "runs" / "bad"
    (run_dir / "stages").mkdir(parents=True)
    import pandas as pd

    pd.DataFrame({"question_class": ["text_presence"], "source": ["s"], "img_id": ["i"]}).to_parquet(
        run_dir / "stages" / "facts.parquet")
    proc = run_cli("add-class", "polyp_count", "--run", str(run_dir), "--config", str(cfg), check=False)
    assert one_error_line(proc, 2) == one_error_line(run_cli("build", "-c", str(cfg), check=False), 2)


# --- the mapping from exceptions to exit codes ----------------------------------------------------------

def test_exit_codes_of_known_failures():
    from flows.cli import exit_for
    from generate.batch_backend import BatchPending
    from kvqa.errors import BadInput, RunRejected, StageFailed

    full = StageFailed("release", OSError(28, "No space left on device"), 412_000_000, Path("runs/x"))
    assert (full.stage, full.cause.errno) == ("release", 28)
    assert exit_for(full) == (2, "error: stage release: [Errno 28] No space left on device (412.0 MB written to runs/x)")
    assert exit_for(RunRejected("105 of 105 plans rejected (100.0% > 5.0%): request_failed 105")) == (
        1, "error: run rejected: 105 of 105 plans rejected (100.0% > 5.0%): request_failed 105")
    assert exit_for(BadInput("a.csv:3: not UTF-8\n")) == (2, "error: a.csv:3: not UTF-8")
    pending = BatchPending(Path("b.jsonl"), 12)
    assert exit_for(pending) == (3, f"waiting for batch results: {pending}")
    assert exit_for(KeyError("a bug")) is None  # keeps its traceback


def test_prefect_records_of_known_failures_are_dropped():
    """Prefect logs a failed flow with its traceback before the exception reaches the CLI."""
    from flows.cli import _KnownFailureFilter
    from kvqa.errors import RunRejected

    def record(msg: str, exc: BaseException | None = None) -> logging.LogRecord:
        info = (type(exc), exc, None) if exc else None
        return logging.LogRecord("prefect.flow_runs", logging.ERROR, __file__, 1, msg, None, info)

    quiet = _KnownFailureFilter()
    rejected = RunRejected("the release is empty")
    assert not quiet.filter(record("Encountered exception during execution", rejected))
    assert not quiet.filter(record("Finished in state Failed('Flow run encountered an exception "
                                   "RunRejected: the release is empty')"))
    assert quiet.filter(record("Encountered exception during execution", KeyError("a bug")))
    assert quiet.filter(record("Finished in state Completed()"))


def test_rejection_and_empty_release_problems():
    from generate.quality import empty_release_problem, rejection_problem

    assert rejection_problem(105, {"request_failed": 105}, 0.05) == (
        "105 of 105 plans rejected (100.0% > 5.0%): request_failed 105")
    assert rejection_problem(1000, {"ungrounded": 30, "request_failed": 30, "invalid_json": 0}, 0.05) == (
        "60 of 1,000 plans rejected (6.0% > 5.0%): request_failed 30, ungrounded 30")
    assert rejection_problem(1000, {"ungrounded": 50}, 0.05) is None  # exactly at the bound is allowed
    assert rejection_problem(0, {}, 0.05) is None
    assert rejection_problem(10, {"x": 1}, 0.0) == "1 of 10 plans rejected (10.0% > 0.0%): x 1"
    assert empty_release_problem({"train": 3, "test": 0}) is None
    assert empty_release_problem({"train": 0, "test": 0}, {"images/missing_image": 75, "sources/x": 0}) == (
        "the release is empty (train 0, test 0 rows); quarantined: images/missing_image 75")
    assert empty_release_problem({}) == "the release is empty (no splits)"


def test_max_rejected_share_is_a_share():
    from kvqa.config import GenerateConfig

    assert GenerateConfig().max_rejected_share == 0.05
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError):
            GenerateConfig(max_rejected_share=bad)


# --- end to end: runs that produce nothing, a full disk ------------------------------------------------

def small_run_config(tmp_path: Path, images: Path | None = None, **extra) -> Path:
    """The sample's Kvasir-VQA part without dedup and the augmented track: the fastest real build."""
    return write_config(tmp_path / "c.yaml", SAMPLE_DIR / "metadata.csv", images or SAMPLE_DIR / "images",
                        run_name="small", dedup={"enabled": False}, augment={"enabled": False}, **extra)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def last_error_line(proc: subprocess.CompletedProcess, code: int) -> str:
    """A run that started logs its stages; it must still end in one `error:` line and no traceback."""
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ")
    return line


def test_unreachable_llm_server_rejects_the_run(tmp_path):
    cfg = small_run_config(tmp_path, generate={"backend": "openai", "llm": {
        "base_url": f"http://127.0.0.1:{closed_port()}/v1", "max_retries": 0, "timeout_s": 5,
        "cache_dir": str(tmp_path / "llm-cache")}})
    proc = run_cli("build", "--config", str(cfg), env={"OPENAI_API_KEY": "sk-test"}, check=False)
    line = last_error_line(proc, 1)
    assert line.startswith("error: run rejected: ") and "(100.0% > 5.0%): request_failed" in line


def test_failed_requests_are_retried_by_the_next_run_and_rejected_runs_keep_their_report(tmp_path):
    """A server failing some requests (HTTP 500, no retries): the run is rejected (exit 1) and still writes
    report.json and quarantine.parquet; the same command once the server is well sends exactly the failed
    requests (no flag, no marker deleted by hand), and report.json counts the requests of both executions.
    Then the explanation stage, against a dead server, is rejected by its own share guard. No httpx line
    per request on the console."""
    import json

    import pandas as pd

    from kvqa.tables import stable_hash
    from openai_standin import OpenAIStandIn

    def fail_a_fifth_once(messages, attempt):
        return "500" if attempt == 0 and int(stable_hash(messages[1]["content"])[:8], 16) % 5 == 0 else None

    llm = {"max_retries": 0, "timeout_s": 10, "cache_dir": str(tmp_path / "llm-cache")}
    with OpenAIStandIn(chooser=fail_a_fifth_once) as standin:
        cfg = small_run_config(tmp_path, generate={"backend": "openai", "llm": {**llm, "base_url": standin.url}},
                               explain={"backend": "openai", "llm": {
                                   **llm, "base_url": f"http://127.0.0.1:{closed_port()}/v1"}})
        first = run_cli("build", "--config", str(cfg), check=False)
        sent = standin.requests
        run_dir = tmp_path / "runs" / "small"
        report = json.loads((run_dir / "report.json").read_text())
        quarantine = pd.read_parquet(run_dir / "quarantine.parquet")
        failed = int((quarantine.reason == "request_failed").sum())
        second = run_cli("build", "--config", str(cfg), check=False)
        resent = standin.requests - sent
    line = last_error_line(first, 1)
    assert line.startswith("error: run rejected: ") and f"request_failed {failed:,}" in line
    assert report["rejected"] in line and "dedup" not in report
    assert 0 < failed == report["generate"]["by_reason"]["request_failed"] == report["generate"]["failed_requests"]
    assert report["quarantine"]["by_stage_reason"]["generate/request_failed"] == failed
    assert "HTTP Request" not in first.stderr + second.stderr
    assert resent == failed  # exactly the failed ones, the rest from the cache
    line = last_error_line(second, 1)
    report = json.loads((run_dir / "report.json").read_text())
    plans, rows = report["plans"]["plans"], report["explain"]["rows"]
    assert line == (f"error: run rejected: explain: {rows:,} of {rows:,} QA rows rejected (100.0% > 5.0%): "
                    f"request_failed {rows:,}")
    assert report["quarantine"]["by_stage_reason"]["explain/request_failed"] == rows
    usage = report["generate"]["llm_usage"]["compose"]
    assert usage["requests"] == sent + resent == plans + failed and usage["failed"] == failed
    assert usage["last_execution"]["requests"] == failed and usage["last_execution"]["cached"] == plans - failed


def test_empty_release_rejects_the_run(tmp_path):
    """An image folder without the images: every image `missing_image`, nothing to release."""
    empty = tmp_path / "no-images"
    empty.mkdir()
    proc = run_cli("build", "--config", str(small_run_config(tmp_path, images=empty)), check=False)
    line = last_error_line(proc, 1)
    assert line.startswith("error: run rejected: the release is empty (") and "images/missing_image" in line


@contextmanager
def tiny_filesystem(folder: Path, size: str):
    """A tmpfs of `size` at `folder` (root only): a real full disk, ENOSPC included. Yields a function
    that grows it, keeping its files: "freeing space"."""
    folder.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small tmpfs needs root")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")

    def grow(new_size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={new_size}", str(folder)], check=True)
    try:
        yield grow
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_full_disk_names_the_stage_and_the_rerun_ends_identical(tmp_path):
    """The release parquet (images embedded) does not fit: one line with the stage, exit 2. With more
    space the same command finishes the run, and its release is the one an uninterrupted run writes."""
    disk = tmp_path / "disk"
    with tiny_filesystem(disk, "400k") as grow:
        cfg = small_run_config(tmp_path, output_root=str(disk / "runs"))
        full = run_cli("build", "--config", str(cfg), check=False)
        grow("64m")
        run_cli("build", "--config", str(cfg))
        resumed = tree_digests(disk / "runs" / "small" / "release")
    run_cli("build", "--config", str(cfg), "--output-root", str(tmp_path / "clean"))
    assert resumed == tree_digests(tmp_path / "clean" / "small" / "release")
    line = last_error_line(full, 2)
    assert "No space left on device" in line and line.startswith("error: stage ")
