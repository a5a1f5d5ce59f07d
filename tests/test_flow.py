"""End to end through the real CLI and Prefect flow on the embedded sample: load, determinism, resume, bad input."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from conftest import copy_sample, run_cli, tree_digests, write_config
from dedup import EmbeddingCache, SentenceTransformerEncoder
from kvqa.cpu_paths import ALL_BASELINE
from kvqa.text import normalise_text


def _counts_from_card(readme: str) -> dict:
    return json.loads(re.search(r"<!-- kvqa-counts\n(.*)\n-->", readme, re.S).group(1))


def load_release(release: Path, cache: Path):
    """`datasets` reuses a cached build of another folder with the same name (seen with datasets 5.2),
    so every load here gets its own cache folder."""
    import datasets

    return datasets.load_dataset(str(release), cache_dir=str(cache))


def test_release_loads_offline_with_datasets(sample_run, tmp_path):
    ds = load_release(sample_run / "release", tmp_path / "hf-cache")
    assert set(ds) == {"train", "test"}
    train, test = ds["train"], ds["test"]
    assert train.column_names[:7] == ["img_id", "complexity", "question", "answer", "original",
                                      "question_class", "image"]
    assert isinstance(train[0]["image"], Image.Image) and train[0]["image"].size == (400, 320)
    # Disjoint by image.
    assert not set(train["img_id"]) & set(test["img_id"])
    # The card's counts are the data's counts.
    card = _counts_from_card((sample_run / "release" / "README.md").read_text())
    for name, split in ds.items():
        df = split.remove_columns("image").to_pandas()
        c = card["splits"][name]
        assert c["rows"] == len(df) and c["images"] == df["img_id"].nunique()
        assert {int(k): v for k, v in c["complexity"].items()} == dict(Counter(df["complexity"]))
        assert c["question_class"] == dict(Counter(x for cl in df["question_class"] for x in cl))
        assert f"| {name} | {len(df)} | {df['img_id'].nunique()} |" in (sample_run / "release/README.md").read_text()
        for orig, classes, k in zip(df["original"], df["question_class"], df["complexity"]):
            pairs = json.loads(orig)
            assert len(pairs) == len(classes) == k and all(set(p) == {"q", "a"} for p in pairs)


def test_report_reconciles(sample_run):
    report = json.loads((sample_run / "report.json").read_text())
    s = report["sources"]
    assert s["rows_read"] == s["rows_in_facts"] + s["quarantined"]
    assert report["plans"]["plans"] == report["generate"]["qa"] + report["generate"]["rejected"]
    assert report["generate"]["qa"] == sum(report["release"]["rows"].values()) + report["release"]["dropped_for_images"]
    q = pd.read_parquet(sample_run / "quarantine.parquet")
    assert len(q) == report["quarantine"]["total"] and (q.stage == "sources").sum() == s["quarantined"]
    assert set(zip(q.stage, q.reason)) == {  # the sample's deliberate quirks and faults, nothing else
        ("sources", "dropped_question"), ("sources", "empty_question"), ("sources", "malformed_row"),
        ("sources", "duplicate_image"), ("sources", "inconsistent_labels"), ("sources", "bad_box"),
        ("sources", "unlabelled_image"), ("images", "missing_image"), ("publish", "image_quarantined")}


def _same_run(a: Path, b: Path) -> None:
    """Byte-identical run folders, except that ms-swift files name images by absolute path."""
    da, db = tree_digests(a), tree_digests(b)
    assert {k: v for k, v in da.items() if not k.startswith("export/")} == \
           {k: v for k, v in db.items() if not k.startswith("export/")}
    assert set(da) == set(db)
    for name in (k for k in da if k.startswith("export/")):
        assert (a / name).read_text().replace(str(a), "RUN") == (b / name).read_text().replace(str(b), "RUN")


def test_killed_run_resumes_to_the_same_bytes_and_a_rerun_is_cached(sample_run, tmp_path):
    """One run killed after each of three stages in turn (each re-run resumes the last one's kill), then
    finished: every resume keeps what was marked done, redoes the unmarked stage, and the end is the
    uninterrupted run's bytes. Every stage of it ran in another process than `sample_run`'s, and on other CPU
    kernels (`ALL_BASELINE`: torch, numpy, OpenCV, faiss, libjpeg-turbo and OpenBLAS forced below AVX2, the
    paths another CPU would take), so this is also the two-runs-are-byte-identical check and README's
    cross-machine one: the embedding vectors moved (checked below), the tables did not. Then a re-run is wholly
    cached and changes nothing. One chain instead of a fresh run per kill point (and a third build) keeps the
    test to about one build."""
    root = tmp_path / "runs"
    previous = None
    for stage in ["generate", "augment", "release", None]:
        env = {**ALL_BASELINE, **({"KVQA_KILL_AFTER_STAGE": stage} if stage else {})}
        proc = run_cli("build", "--output-root", str(root), env=env, check=stage is None)
        if stage:
            assert proc.returncode == -signal.SIGKILL
            assert not (root / "sample" / "report.json").exists()
        if previous:
            assert "stage sources   cached" in proc.stderr  # finished stages are not redone
            assert f"stage {previous:<9} cached" not in proc.stderr  # the unmarked stage is redone
            assert f"stage {previous:<9} done" in proc.stderr
        previous = stage
    _same_run(root / "sample", sample_run)
    # The forced kernels ran, and gave other last bits: the shared cache holds both paths' vectors, apart.
    questions = pd.read_parquet(sample_run / "stages" / "qa.parquet").question
    texts = sorted({normalise_text(q, punctuation=False) for q in questions})
    native, forced = (EmbeddingCache(Path(os.environ["KVQA_EMBED_CACHE"]), vectors_id).lookup(texts)
                      for vectors_id in (SentenceTransformerEncoder().vectors_id, forced_vectors_id()))
    assert len(native) == len(forced) == len(texts)
    assert any(not np.array_equal(native[t], forced[t]) for t in texts)
    assert max(float(np.abs(native[t] - forced[t]).max()) for t in texts) < 1e-5
    again = run_cli("build", "--output-root", str(root), env=ALL_BASELINE)
    markers = list((root / "sample" / "stages").glob("*.done.json"))
    assert again.stderr.count(" cached (key ") == len(markers) == 15 and " done: " not in again.stderr
    _same_run(root / "sample", sample_run)


def forced_vectors_id() -> str:
    """The torch encoder's `vectors_id` in a process under `ALL_BASELINE`."""
    probe = "from dedup import SentenceTransformerEncoder; print(SentenceTransformerEncoder().vectors_id)"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                          env={**os.environ, **ALL_BASELINE}).stdout.strip()


def test_every_stage_of_a_build_ran_as_its_own_prefect_task_run(sample_run):
    """A stage wired as a plain function (the images stage once lost its @task to a helper inserted under
    the decorator) writes the same outputs, so only its marker can show it: every marker names the Prefect
    task run that wrote it (its logs and timings are there), one task run per stage."""
    markers = {p.name.removesuffix(".done.json"): json.loads(p.read_text())
               for p in (sample_run / "stages").glob("*.done.json")}
    runs = {stage: marker["prefect"] for stage, marker in markers.items()}
    assert len(runs) == 15 and not [stage for stage, run in runs.items() if not run]
    assert len({run["task_run"] for run in runs.values()}) == len(runs)
    # One name per stage: the Prefect task, the build function and the marker.
    assert {stage: run["task"] for stage, run in runs.items()} == {stage: stage for stage in runs}


def test_bad_input_is_quarantined_and_counts_reconcile(tmp_path):
    csv_path, images = copy_sample(tmp_path / "sample")
    ids = sorted(p.stem for p in images.glob("*.jpg"))
    corrupt, missing = ids[0], ids[1]
    data = (images / f"{corrupt}.jpg").read_bytes()
    (images / f"{corrupt}.jpg").write_bytes(data[: len(data) // 2])  # truncated JPEG
    (images / f"{missing}.jpg").unlink()
    with open(csv_path, "a") as f:
        f.write("Polyps,Is there text?,yes\n")                                  # malformed row
        f.write(f"Polyps,Is the patient sedated?,yes,{ids[2]}\n")               # unknown question
    cfg = write_config(tmp_path / "bad.yaml", csv_path, images, run_name="bad", augment={"enabled": False})
    run_cli("build", "--config", str(cfg))
    run = tmp_path / "runs" / "bad"
    q = pd.read_parquet(run / "quarantine.parquet")
    by = {(r.stage, r.reason): r for r in q.itertuples()}
    assert by[("images", "corrupt_image")].key == corrupt
    assert by[("images", "missing_image")].key == missing
    assert ("sources", "malformed_row") in by and ("sources", "unknown_question") in by
    qa = pd.read_parquet(run / "stages" / "qa.parquet")
    lost = q[q.stage == "publish"]
    assert set(lost["reason"]) == {"image_quarantined"}
    assert set(qa[qa.qa_id.isin(lost.key)].img_id) == {corrupt, missing}
    report = json.loads((run / "report.json").read_text())
    assert report["sources"]["rows_read"] == report["sources"]["rows_in_facts"] + report["sources"]["quarantined"]
    assert len(qa) == sum(report["release"]["rows"].values()) + len(lost)
    ds = load_release(run / "release", tmp_path / "hf-cache")
    assert not {corrupt, missing} & (set(ds["train"]["img_id"]) | set(ds["test"]["img_id"]))


def test_bad_config_and_missing_inputs_are_one_line_errors(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "nope.csv", tmp_path / "nope", run_name="x",
                       plans={"level_ratios": {4: 1.0}})
    proc = run_cli("build", "--config", str(cfg), check=False)
    assert proc.returncode == 2 and "level_ratios keys must be 2 or 3" in proc.stderr
    assert "Traceback" not in proc.stderr
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "nope.csv", tmp_path / "nope", run_name="x")
    proc = run_cli("build", "--config", str(cfg), check=False)
    assert proc.returncode == 2 and f"input not found: {tmp_path / 'nope.csv'}" in proc.stderr
