"""`runner: {kind: dask}`: the image inventory and the augmented track as Prefect tasks on a Dask LocalCluster."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, run_cli, tree_digests
from kvqa.config import SOURCE_PATH_KEYS, ConfigError, load_config
from kvqa.fanout import contiguous_chunks, task_count


def dask_config(tmp_path: Path, **runner) -> Path:
    """The embedded sample's config with absolute paths and a Dask runner."""
    data = yaml.safe_load((ROOT / "data/configs/sample.yaml").read_text())
    for src in data["sources"]:
        for key in SOURCE_PATH_KEYS:
            if key in src:
                src[key] = str((ROOT / "data/configs" / src[key]).resolve())
    data["runner"] = {"kind": "dask", **runner}
    path = tmp_path / "dask.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_augment_track_on_a_local_dask_cluster_is_byte_identical(sample_run, tmp_path):
    root = tmp_path / "runs"
    proc = run_cli("augment", "--config", str(dask_config(tmp_path, n_workers=2, chunks_per_worker=2)),
                   "--output-root", str(root))
    # 75 images = 10 records batches of 8, grouped for 2 workers x 2 chunks: 4 task runs (of 2-3 batches).
    assert "augment: 4 chunks as Prefect tasks on Dask (LocalCluster of 2 workers)" in proc.stderr
    # The image inventory (hash, full decode, fingerprint) fans out too: 75 images, 2 workers x 2 chunks.
    assert "check-images: 4 chunks as Prefect tasks on Dask" in proc.stderr
    ours = root / "sample"
    for table in ("images", "quarantine_images"):
        assert (ours / f"stages/{table}.parquet").read_bytes() == (sample_run / f"stages/{table}.parquet").read_bytes()
    assert (ours / "stages/augmentations.parquet").read_bytes() == \
        (sample_run / "stages/augmentations.parquet").read_bytes()
    assert tree_digests(ours / "augmented") == tree_digests(sample_run / "augmented")
    # The records are persisted per batch, whatever the task chunks: the same files as the local runner's.
    assert tree_digests(ours / "augment/records") == tree_digests(sample_run / "augment/records")


REALIZE_ON_DASK = """
import logging
import sys
from pathlib import Path

from flows.steps import stage_runners
from generate.stages import GENERATE
from kvqa.config import load_config
from kvqa.stage import StageRun, run_stage

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, force=True)  # prefect has configured the root logger
    cfg = load_config(sys.argv[1])
    run_stage(GENERATE, StageRun(cfg, Path(sys.argv[2]), runners=stage_runners(cfg)))  # as the flow runs it
"""


def test_template_realization_in_chunks_and_on_dask_is_byte_identical(sample_run, tmp_path):
    """Realization and grounding fan out in chunks keyed by a hash of (source, img_id): whatever the
    number of chunks, the order they finish in, or the worker, the tables are the local build's bytes.
    The Dask run is a process of its own: a flow run here would leave Prefect's services in the test
    process, and a later test that forks it (a `fork` pool) would hang in the child."""
    from generate.realize import image_chunks, in_plan_order, realize_chunk
    from kvqa.catalog import load_catalog
    from kvqa.tables import read_table, write_table

    config = dask_config(tmp_path, n_workers=2, chunks_per_worker=2)
    cfg = load_config(config)
    catalog = load_catalog(cfg.catalog)
    facts, plans = (read_table(sample_run / f"stages/{name}.parquet") for name in ("facts", "plans"))

    def same_tables(folder: Path) -> None:
        for table in ("qa", "quarantine_generate"):
            assert (folder / f"{table}.parquet").read_bytes() == \
                (sample_run / f"stages/{table}.parquet").read_bytes(), (folder.name, table)

    for n in (1, 7):
        chunks = image_chunks(plans, facts, n)
        assert sorted(p for c, _ in chunks for p in c["plan_id"]) == sorted(plans["plan_id"])
        qa, rejected = in_plan_order(plans, [realize_chunk(c, cfg.generate, catalog, cfg.seed) for c in reversed(chunks)])
        write_table(qa, tmp_path / f"local{n}" / "qa.parquet")
        write_table(rejected, tmp_path / f"local{n}" / "quarantine_generate.parquet")
        same_tables(tmp_path / f"local{n}")
    run = tmp_path / "dask"
    (run / "stages").mkdir(parents=True)
    for name in ("facts", "plans"):
        shutil.copy(sample_run / f"stages/{name}.parquet", run / f"stages/{name}.parquet")
    script = tmp_path / "realize_on_dask.py"
    script.write_text(REALIZE_ON_DASK)
    proc = subprocess.run([sys.executable, str(script), str(config), str(run)],
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "realize: 4 chunks as Prefect tasks on Dask (LocalCluster of 2 workers)" in proc.stderr
    same_tables(run / "stages")


DEDUP_ON_DASK = """
import logging
import sys
from pathlib import Path

from dedup.stages import DEDUP
from flows.steps import stage_runners
from kvqa.config import load_config
from kvqa.stage import StageRun, run_stage

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, force=True)  # prefect has configured the root logger
    cfg = load_config(sys.argv[1])
    cfg = cfg.model_copy(update={"dedup": cfg.dedup.model_copy(update={"cache_dir": Path(sys.argv[3])})})
    run_stage(DEDUP, StageRun(cfg, Path(sys.argv[2]), runners=stage_runners(cfg)))  # as the flow runs it
"""


def segment_vectors(folder: Path) -> dict:
    from dedup.embed import read_segment

    return {k: v for seg in sorted(folder.glob("seg-*.npz")) for k, v in zip(*read_segment(seg))}


def test_embedding_blocks_on_dask_give_the_local_vectors_bit_for_bit(sample_run, tmp_path):
    """The dedup stage's embedding fans out in blocks cut before the fan-out: the workers store the very
    vectors the flow's process would (a vector depends on its block's padding), and the stage's tables are
    the local build's bytes. Both caches start empty, so every text is encoded on each side. One chunk per
    worker: one chunk carries two blocks, which must still be encoded (and stored) one block at a time."""
    import numpy as np

    from dedup import EmbeddingCache, embed_texts, encoder_for
    from kvqa.text import normalise_text
    from dedup.embed import ENCODE_BLOCK_TEXTS
    from kvqa.tables import read_table

    config = dask_config(tmp_path, n_workers=2, chunks_per_worker=1)
    run = tmp_path / "dask"
    (run / "stages").mkdir(parents=True)
    shutil.copy(sample_run / "stages/qa.parquet", run / "stages/qa.parquet")
    script = tmp_path / "dedup_on_dask.py"
    script.write_text(DEDUP_ON_DASK)
    proc = subprocess.run([sys.executable, str(script), str(config), str(run), str(tmp_path / "dask-cache")],
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    texts = {normalise_text(q, punctuation=False) for q in read_table(sample_run / "stages/qa.parquet")["question"]}
    blocks = -(-len(texts) // ENCODE_BLOCK_TEXTS)
    assert blocks == 3  # 1,296 texts: blocks of 512, 512 and 272, in 2 task runs (2 blocks and 1)
    assert "embed: 2 chunks as Prefect tasks on Dask (LocalCluster of 2 workers)" in proc.stderr
    for table in ("qa_dedup", "duplicates"):
        assert (run / f"stages/{table}.parquet").read_bytes() == (sample_run / f"stages/{table}.parquet").read_bytes()

    cfg = load_config(config)
    encoder = encoder_for(cfg.dedup)
    embed_texts(sorted(texts, reverse=True), encoder, EmbeddingCache(tmp_path / "local-cache", encoder.vectors_id))
    assert encoder.texts_encoded == len(texts)
    local, remote = segment_vectors(tmp_path / "local-cache"), segment_vectors(tmp_path / "dask-cache")
    assert len(list((tmp_path / "dask-cache").glob("seg-*.npz"))) == blocks  # stored by the workers, per block
    assert local.keys() == remote.keys() and len(local) == len(texts)
    assert all(np.array_equal(local[k], remote[k]) for k in local)


def test_embedding_chunks_are_encoded_block_by_block_with_the_flows_model(tmp_path, monkeypatch):
    """What a worker does with a chunk of blocks, without a model or a cluster: one encoder call and one
    cache segment per block (a call over a whole chunk would pad its texts otherwise, and give other vectors),
    vectors back in the texts' places, and a worker that computes vectors otherwise than the flow (another
    model, library version or CPU kind) refuses to encode."""
    import numpy as np

    import dedup.embed
    import flows.dask_runner
    from dedup import EmbeddingCache, embed_texts
    from kvqa.config import DedupConfig, RunnerConfig
    from test_dedup import HashEncoder

    class RecordingEncoder(HashEncoder):
        calls: list = []

        def encode(self, texts):
            self.calls.append(list(texts))
            return super().encode(texts)

    worker_encoder = RecordingEncoder()
    monkeypatch.setattr(dedup.embed, "process_encoder", lambda *a: worker_encoder)
    monkeypatch.setattr(flows.dask_runner, "map_on_dask",
                        lambda runner, label, fn, chunks, *args: [fn(c, *args) for c in reversed(chunks)][::-1])
    runner = RunnerConfig(kind="dask", n_workers=2, chunks_per_worker=1)
    texts = [f"is there {'a very ' * (i % 4)}polyp number {i}" for i in range(23)] * 2
    flow_encoder = HashEncoder()
    run_blocks = flows.dask_runner.embed_on_dask(runner, DedupConfig(), tmp_path, HashEncoder.vectors_id)
    vectors = embed_texts(texts, flow_encoder, EmbeddingCache(tmp_path, HashEncoder.vectors_id), run_blocks,
                          block_size=5)
    np.testing.assert_array_equal(vectors, HashEncoder().encode(texts))
    assert sorted(map(sorted, RecordingEncoder.calls)) == sorted(map(sorted, dedup.embed.text_blocks(texts, 5)))
    assert len(list(tmp_path.glob("seg-*.npz"))) == 5 and flow_encoder.texts_encoded == 23
    with pytest.raises(RuntimeError, match="this worker computes vectors as hash-encoder, the flow as other-model"):
        flows.dask_runner.embed_on_dask(runner, DedupConfig(), None, "other-model")([["is there a polyp"]])


PROBE = """
import json, os
os.environ.pop("PREFECT_API_URL", None)  # as a user runs kvqa: Prefect starts its temporary server
from prefect import flow
from flows.dask_runner import map_on_dask, prefect_api_url
from kvqa.config import RunnerConfig

@flow
def probe():
    return prefect_api_url(), map_on_dask(RunnerConfig(kind="dask", n_workers=1), "probe", os.getenv,
                                          ["PREFECT_API_URL", "OMP_NUM_THREADS"])

if __name__ == "__main__":
    os.environ.pop("OMP_NUM_THREADS", None)
    ours, theirs = probe()
    print(json.dumps([ours, theirs, os.environ.get("OMP_NUM_THREADS")]))
"""


def test_local_cluster_workers_report_to_the_flows_prefect_server(tmp_path):
    """Task runs execute on the workers: they must report to the flow's Prefect API. Before, a worker
    without PREFECT_API_URL started a temporary server of its own (≈9 s of CPU each) and its task runs were
    recorded there, out of the flow's sight. And the flow's process keeps its environment."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours, theirs, flows_threads = json.loads(proc.stdout.strip().splitlines()[-1])
    assert ours.startswith("http://127.0.0.1") and theirs == [ours, "1"]  # a worker: one thread per library
    # The flow's process keeps its own: distributed's Nanny wrote OMP_NUM_THREADS=1 & co. into the
    # environment of the process that started the LocalCluster, and torch and faiss ran on one thread there.
    assert flows_threads is None


def test_task_runs_bounded_by_workers_not_images():
    batches = [[{"img_id": f"{i}-{j}"} for j in range(8)] for i in range(100_000 // 8)]
    for workers in (1, 2, 16, 64):
        tasks = task_count(len(batches), workers, 16)
        chunks = contiguous_chunks(batches, tasks)
        assert len(chunks) == tasks <= 16 * workers
        assert [b for c in chunks for b in c] == batches  # every batch once, in order
        assert max(map(len, chunks)) - min(map(len, chunks)) <= 1
    assert task_count(3, 2, 16) == 3  # small work: never more task runs than batches
    assert contiguous_chunks([], 4) == []


def test_runner_config_validated(tmp_path):
    assert load_config(dask_config(tmp_path, address="tcp://10.0.0.5:8786")).runner.address == "tcp://10.0.0.5:8786"
    with pytest.raises(ConfigError, match="runner"):
        load_config(dask_config(tmp_path, address="10.0.0.5:8786"))
    with pytest.raises(ConfigError, match="runner"):
        load_config(dask_config(tmp_path, n_workers=0))
    with pytest.raises(ConfigError, match="runner"):
        load_config(dask_config(tmp_path, min_chunk_images=8))  # gone: the records batch is augment.batch_size
