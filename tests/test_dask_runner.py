"""`runner: {kind: dask}`: the augmented track as Prefect tasks on a 2-worker Dask LocalCluster."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from augment.track import sized_chunk
from conftest import ROOT, run_cli, tree_digests
from kvqa.config import SOURCE_PATH_KEYS, ConfigError, load_config


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
    proc = run_cli("augment", "--config", str(dask_config(tmp_path, n_workers=2, min_chunk_images=4)),
                   "--output-root", str(root))
    assert "8 chunks as Prefect tasks on Dask (LocalCluster of 2 workers)" in proc.stderr
    ours = root / "sample"
    assert (ours / "stages/augmentations.parquet").read_bytes() == \
        (sample_run / "stages/augmentations.parquet").read_bytes()
    assert tree_digests(ours / "augmented") == tree_digests(sample_run / "augmented")
    # 75 images, 2 workers x 4 chunks: at most 8 task runs (the local runner makes 10 of 8 images).
    assert len(list((ours / "augment/records").glob("chunk-*.parquet"))) <= 8


def test_task_runs_bounded_by_workers_not_images():
    for workers in (1, 2, 16, 64):
        size = sized_chunk(100_000, workers, 4, 8)
        assert -(-100_000 // size) <= 4 * workers
    assert sized_chunk(10, 2, 4, 8) == 8  # small work: chunks keep their minimum size


def test_runner_config_validated(tmp_path):
    assert load_config(dask_config(tmp_path, address="tcp://10.0.0.5:8786")).runner.address == "tcp://10.0.0.5:8786"
    with pytest.raises(ConfigError, match="runner"):
        load_config(dask_config(tmp_path, address="10.0.0.5:8786"))
    with pytest.raises(ConfigError, match="runner"):
        load_config(dask_config(tmp_path, n_workers=0))
