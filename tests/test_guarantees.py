"""The guarantees that keep a run from being silently wrong: stage keys that cover the code that decides
a stage's output, a card that is its own stage, one writer per run folder, dedup removals that reconcile,
and `add-class`'s rollback."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from PIL import Image

from conftest import ROOT, copy_sample, run_cli, tree_digests, write_config


# --- stage keys -------------------------------------------------------------------------------------------

def _package(root: Path, name: str, source: str) -> Path:
    (root / name).mkdir(parents=True, exist_ok=True)
    (root / name / "__init__.py").write_text("")
    (root / name / "mod.py").write_text(source)
    return root / name / "mod.py"


def test_stage_key_covers_every_package_the_stage_imports_and_not_the_flows(tmp_path, monkeypatch):
    from kvqa import stage as stage_cache

    _package(tmp_path, "kvqa", "X = 1\n")
    helper = _package(tmp_path, "generate", "from kvqa.mod import X\n")
    _package(tmp_path, "dedup", "from generate.mod import X\n")
    flow = _package(tmp_path, "flows", "from dedup.mod import X\n")
    _package(tmp_path, "publish", "Y = 2\n")
    monkeypatch.setattr(stage_cache, "CODE_ROOT", tmp_path)

    def version(*packages):
        stage_cache._imported_packages.cache_clear()
        return stage_cache.code_version(*packages)

    assert stage_cache.stage_packages("dedup") == ["dedup", "generate", "kvqa"]
    before, publish_before = version("dedup"), version("publish")
    helper.write_text("from kvqa.mod import X\nZ = X + 1\n")  # a helper in another package changes
    assert version("dedup") != before
    assert version("publish") == publish_before  # publish does not run it
    changed = version("dedup")
    flow.write_text("from dedup.mod import X\n# orchestration only\n")
    assert version("dedup") == changed  # the flows decide nothing a stage writes


def test_real_stage_keys_follow_imports():
    from kvqa.stage import stage_packages

    # dedup's calibration uses the template realizer: a template change must redo dedup.
    assert "generate" in stage_packages("dedup")
    assert "flows" not in {p for s in ("sources", "generate", "dedup", "augment", "publish")
                           for p in stage_packages(s)}
    # Nothing a stage runs lives in flows/ any more: the stage packages never import it.
    for pkg in ("sources", "generate", "dedup", "augment", "publish", "explain", "kvqa", "review", "report"):
        for path in (ROOT / pkg).rglob("*.py"):
            text = path.read_text()
            assert "from flows" not in text and "import flows" not in text, path


# --- one writer per run folder ----------------------------------------------------------------------------

HOLD_LOCK = """
import sys, time
from flows.run_state import run_lock
with run_lock(sys.argv[1], "test holder"):
    print("held", flush=True)
    time.sleep(120)
"""


def _hold_lock(run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_dir)], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True, start_new_session=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_command_on_a_held_run_fails_at_once_naming_the_run(tmp_path):
    csv_path, images = copy_sample(tmp_path / "sample")
    cfg = write_config(tmp_path / "c.yaml", csv_path, images, run_name="busy", augment={"enabled": False})
    holder = _hold_lock(tmp_path / "runs" / "busy")
    try:
        for args in (["build", "--config", str(cfg)], ["augment", "--config", str(cfg)]):
            start = time.monotonic()
            proc = run_cli(*args, check=False)
            assert proc.returncode == 2, proc.stderr
            lines = [line for line in proc.stderr.splitlines() if line.strip()]
            assert lines[-1].startswith("error: run 'busy'") and "in use by another kvqa command" in lines[-1]
            assert f"pid {holder.pid}" in lines[-1] and "Traceback" not in proc.stderr
            assert time.monotonic() - start < 30
        assert not (tmp_path / "runs" / "busy" / "stages").exists()  # the loser wrote nothing
    finally:
        os.killpg(holder.pid, signal.SIGKILL)  # a holder that dies, however, frees the run
        holder.wait()
    from flows.run_state import run_lock

    with run_lock(tmp_path / "runs" / "busy", "after the holder died"):  # taken at once, no stale lock
        pass


def test_run_lock_is_reentrant_in_one_process(tmp_path):
    from flows.run_state import RunBusyError, run_lock

    with run_lock(tmp_path / "r", "outer"):
        with run_lock(tmp_path / "r", "inner (a subflow)"):
            pass
        holder = subprocess.run([sys.executable, "-c",
                                 "import sys\nfrom flows.run_state import run_lock\n"
                                 "with run_lock(sys.argv[1], 'other'): pass", str(tmp_path / "r")],
                                cwd=ROOT, capture_output=True, text=True)
        assert holder.returncode != 0 and "RunBusyError" in holder.stderr
    with run_lock(tmp_path / "r", "again"):  # released by the outer block
        pass
    with pytest.raises(RunBusyError):
        proc = _hold_lock(tmp_path / "r2")
        try:
            with run_lock(tmp_path / "r2", "second"):
                pass
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# --- dedup removals reconcile; the card is its own stage --------------------------------------------------

@pytest.fixture(scope="module")
def capped_run(tmp_path_factory) -> Path:
    """The sample's Kvasir-VQA part with a global cap of 2 rows per phrasing: dedup removes rows."""
    tmp = tmp_path_factory.mktemp("capped")
    csv_path, images = copy_sample(tmp / "sample")
    cfg = write_config(tmp / "c.yaml", csv_path, images, run_name="capped", dedup={"max_repeats": 2},
                       augment={"enabled": False})
    run_cli("build", "--config", str(cfg))
    return tmp / "runs" / "capped"


def test_dedup_removals_reconcile_through_the_flow(capped_run):
    report = json.loads((capped_run / "report.json").read_text())
    d = report["dedup"]
    removed = pd.read_parquet(capped_run / "stages" / "duplicates.parquet")
    assert d["rows_removed"] == len(removed) > 50 and set(removed["rule"]) == {"cap"}
    qa = pd.read_parquet(capped_run / "stages" / "qa.parquet")
    kept = pd.read_parquet(capped_run / "stages" / "qa_dedup.parquet")
    assert len(qa) == len(kept) + len(removed) == d["rows_in"]
    assert not set(kept["qa_id"]) & set(removed["qa_id"]) and set(removed["duplicate_of"]) <= set(kept["qa_id"])
    assert report["generate"]["qa"] == (sum(report["release"]["rows"].values())
                                        + report["release"]["dropped_for_images"] + d["rows_removed"])
    from kvqa.text import normalise_text

    assert kept["question"].map(lambda q: normalise_text(q, punctuation=False)).value_counts().max() <= 2


def test_a_card_change_does_not_rewrite_the_shards(capped_run, tmp_path):
    cfg = yaml.safe_load((capped_run.parent.parent / "c.yaml").read_text())
    before = tree_digests(capped_run)
    cfg["publish"] = {"pretty_name": "another title"}
    path = capped_run.parent.parent / "c2.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = run_cli("build", "--config", str(path))
    assert "stage release   cached" in proc.stderr and "stage card      done" in proc.stderr
    after = tree_digests(capped_run)
    changed = {k for k in before if before[k] != after.get(k)}
    assert changed == {"release/README.md", "run.json"}  # run.json: the config file it was built from
    assert "# another title" in (capped_run / "release" / "README.md").read_text()


# --- add-class rollback -----------------------------------------------------------------------------------

def _moves_a_split(run: Path, new_id: str, path: Path) -> bool:
    from publish.split import assign_splits
    from sources.images import check_image

    images = pd.read_parquet(run / "stages" / "images.parquet")
    splits = pd.read_parquet(run / "stages" / "splits.parquet")
    keep = ["source", "img_id", "sha256", "fingerprint", "window_fingerprints"]
    usable = splits.merge(images[keep], on=["source", "img_id"])
    checked = check_image(path)
    extra = pd.DataFrame([{"source": "kvasir-vqa", "img_id": new_id, "source_label": "Polyps",
                           **{k: checked[k] for k in keep[2:]}}])
    again = assign_splits(pd.concat([usable.drop(columns="split"), extra], ignore_index=True), 0.25, 42)
    merged = usable.merge(again, on=["source", "img_id"], suffixes=("", "_new"))
    return bool((merged["split"] != merged["split_new"]).any())


def test_add_class_that_would_change_rows_is_rolled_back_to_the_same_bytes(tmp_path):
    csv_path, images = copy_sample(tmp_path / "sample")
    catalog = yaml.safe_load((ROOT / "prompts" / "question_classes.yaml").read_text())
    cat_path = tmp_path / "catalog.yaml"
    cat_path.write_text(yaml.safe_dump(catalog, sort_keys=False))
    cfg = write_config(tmp_path / "c.yaml", csv_path, images, run_name="rb", catalog=str(cat_path),
                       split={"test_fraction": 0.25}, augment={"enabled": False})
    run_cli("build", "--config", str(cfg))
    run = tmp_path / "runs" / "rb"
    # An image whose only label row is a question no class claims yet: the run does not have it. Its id
    # is chosen so that it lands in the split order before an image of the run (it moves the split).
    # A picture of its own (turned upside down: not a near duplicate of the frame, which would join its
    # cluster and move nothing).
    frame = Image.open(sorted(images.glob("*.jpg"))[0]).convert("RGB").transpose(Image.Transpose.ROTATE_180)
    new_id = next(f"clrollback{i:015d}" for i in range(1000)
                  if (frame.save(images / f"clrollback{i:015d}.jpg", quality=90) or True)
                  and _moves_a_split(run, f"clrollback{i:015d}", images / f"clrollback{i:015d}.jpg"))
    for stray in images.glob("clrollback*.jpg"):
        if stray.stem != new_id:
            stray.unlink()
    with open(csv_path, "a") as f:
        f.write(f"Polyps,Is the patient sedated?,yes,{new_id}\n")
    run_cli("build", "--config", str(cfg))  # the new row is quarantined (unknown_question): nothing moves
    before = tree_digests(run)
    sedation = copy.deepcopy(catalog["classes"]["text_presence"])
    sedation["source_questions"] = ["Is the patient sedated?"]
    catalog["classes"]["sedation"] = sedation
    cat_path.write_text(yaml.safe_dump(catalog, sort_keys=False))
    proc = run_cli("add-class", "sedation", "--run", "rb", "--output-root", str(tmp_path / "runs"), check=False)
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert proc.returncode == 2 and last.startswith("error: adding 'sedation' would change") and "Rolled back" in last
    assert "Traceback" not in proc.stderr
    assert not (run / "class_additions.json").exists()
    assert tree_digests(run) == before  # every old row and file is back as it was
    assert not (run.parent / ".rb.snapshot").exists()


def test_release_reconciles_ids_so_compensating_errors_fail(capped_run, tmp_path, monkeypatch):
    """A row lost and another counted twice keep the counts equal: the release stage reconciles the ids
    (every QA row kept or quarantined exactly once) and stops naming both."""
    import shutil

    import publish.stages as build
    from kvqa.config import load_config
    from kvqa.reconcile import ReconciliationError
    from kvqa.stage import StageRun, run_stage

    run = tmp_path / "capped"
    shutil.copytree(capped_run, run)
    (run / "stages" / "release.done.json").unlink()
    cfg = load_config(capped_run.parent.parent / "c.yaml")
    real = build.expert_rejected

    def lose_one_and_reject_a_kept_one(qa, verdicts, images):
        kept, expert = real(qa, verdicts, images)
        lost, twice = kept.iloc[0], kept.iloc[1]
        wrong = pd.DataFrame([{"stage": "review", "source": twice.source, "key": twice.qa_id,
                               "reason": "expert_rejected", "detail": "", "raw": ""}])
        return kept.iloc[1:], pd.concat([expert, wrong], ignore_index=True)

    monkeypatch.setattr(build, "expert_rejected", lose_one_and_reject_a_kept_one)
    with pytest.raises(ReconciliationError, match="QA rows: .* missing .* 1 in two parts"):
        run_stage(build.RELEASE, StageRun(cfg, run))
