"""The ONNX backend of the embedding model: the same dedup decisions as torch, on the calibration pairs and on
real rows; its own cache keys; an export made once per folder, published whole, made again when damaged; a
config naming it refused in one line where its optional extra is not installed.

The tests that run the backend need the extra `kvqa[onnx]` (installed by `make`) and skip without it."""

from __future__ import annotations

import importlib.util
import logging
import multiprocessing
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pydantic
import pytest
from test_dedup import plant_paraphrases, real_qa  # noqa: F401  (a fixture, used by name)

import dedup.embed
import kvqa.config
from dedup import (EmbeddingCache, OnnxEncoder, SentenceTransformerEncoder, calibration_pairs, cross_split_leakage,
                   deduplicate, embed_texts, encoder_for, evaluate_threshold, question_vectors)
from dedup.calibration import pair_similarities
from dedup.embed import STALE_TEMP_AGE_S, publish_folder_once
from dedup.frames import nearest_cross_split_pairs
from kvqa.config import ONNX_BACKEND_MODULES, DedupConfig, load_config
from kvqa.errors import ConfigError

ONNX_INSTALLED = all(importlib.util.find_spec(m) is not None for m in ONNX_BACKEND_MODULES)
needs_onnx = pytest.mark.skipif(not ONNX_INSTALLED, reason="dedup.backend onnx needs the optional extra "
                                "kvqa[onnx] (onnx, onnxruntime), not installed here: pip install -e '.[onnx]'")


@pytest.fixture(scope="module")
def torch_encoder():
    return SentenceTransformerEncoder()


@pytest.fixture(scope="module")
def onnx_encoder(tmp_path_factory):
    if not ONNX_INSTALLED:
        pytest.skip(needs_onnx.kwargs["reason"])
    encoder = OnnxEncoder(export_root=tmp_path_factory.mktemp("models"))
    encoder.load()  # the export: once for the module
    assert encoder.exported
    return encoder


def test_same_decisions_on_the_calibration_pairs(catalog, torch_encoder, onnx_encoder):
    pairs = calibration_pairs(catalog)
    by_torch, by_onnx = pair_similarities(pairs, torch_encoder), pair_similarities(pairs, onnx_encoder)
    assert np.abs(by_torch - by_onnx).max() < 1e-5
    threshold = DedupConfig().threshold
    assert ((by_torch >= threshold) == (by_onnx >= threshold)).all()
    assert evaluate_threshold(pairs, None, threshold, by_torch) == evaluate_threshold(pairs, None, threshold, by_onnx)


def test_same_duplicates_and_leakage_on_real_rows(real_qa, catalog, torch_encoder, onnx_encoder,  # noqa: F811
                                                  tmp_path):
    """Real rows of 40 images with a catalog paraphrase planted per level-1 row (so rows are removed), the
    first 10 images repeated as test-split twins of the same frame (so rows leak)."""
    mixed = plant_paraphrases(real_qa, catalog)
    firsts = sorted(mixed.img_id.unique())[:10]
    twins = mixed[mixed.img_id.isin(firsts)].assign(img_id=lambda d: d.img_id + "-twin", qa_id=lambda d: d.qa_id + "t")
    qa = pd.concat([mixed, twins], ignore_index=True)
    images = sorted(qa.img_id.unique())
    splits = pd.DataFrame({"source": "kvasir-vqa", "img_id": images,
                           "split": ["test" if i.endswith("-twin") else "train" for i in images]})
    content = pd.DataFrame({"source": "kvasir-vqa", "img_id": images,
                            "sha256": [i.removesuffix("-twin") for i in images]})
    config = DedupConfig()
    results = {}
    for encoder in (torch_encoder, onnx_encoder):
        cache = EmbeddingCache(tmp_path / encoder.backend, encoder.vectors_id)
        kept, dups, _, _ = deduplicate(qa, config, encoder, cache, seed=42)
        _, vectors = question_vectors(qa, encoder, cache)
        results[encoder.backend] = kept, dups, cross_split_leakage(qa, vectors, nearest_cross_split_pairs(content, splits),
                                                                      config.threshold, 64)
    (kept_t, dups_t, leaks_t), (kept_o, dups_o, leaks_o) = results["torch"], results["onnx"]
    assert len(dups_t) > 0 and len(leaks_t) > 0  # both decisions are exercised
    assert list(kept_t.qa_id) == list(kept_o.qa_id)
    columns = ["qa_id", "duplicate_of", "scope", "rule"]
    pd.testing.assert_frame_equal(dups_t[columns], dups_o[columns])
    np.testing.assert_allclose(dups_t.similarity, dups_o.similarity, atol=2e-4)  # rounded to 4 places
    assert list(zip(leaks_t.test_qa_id, leaks_t.train_qa_id)) == list(zip(leaks_o.test_qa_id, leaks_o.train_qa_id))


def test_backends_never_share_cached_vectors(torch_encoder, onnx_encoder, tmp_path):
    texts = ["is there text", "where is the polyp", "how many instruments are visible"]
    embed_texts(texts, torch_encoder, EmbeddingCache(tmp_path, torch_encoder.vectors_id))
    before = onnx_encoder.texts_encoded
    embed_texts(texts, onnx_encoder, EmbeddingCache(tmp_path, onnx_encoder.vectors_id))
    assert onnx_encoder.texts_encoded - before == len(texts)  # nothing taken from torch's vectors
    assert torch_encoder.model_id != onnx_encoder.model_id and "onnx" in onnx_encoder.model_id


@needs_onnx
def test_config_picks_the_backend():
    assert isinstance(encoder_for(DedupConfig()), SentenceTransformerEncoder)
    assert isinstance(encoder_for(DedupConfig(backend="onnx")), OnnxEncoder)
    with pytest.raises(pydantic.ValidationError):
        DedupConfig(backend="tensorflow")


def test_export_is_reused_not_made_again(onnx_encoder):
    again = OnnxEncoder(export_root=onnx_encoder.export_root)
    vectors = again.encode(["is there a polyp"])
    assert not again.exported and vectors.shape == (1, 384)
    assert [p.name for p in onnx_encoder.export_root.iterdir()] == [onnx_encoder.export_dir.name]  # no temp left


def test_damaged_export_is_moved_aside_and_made_again(onnx_encoder, torch_encoder, tmp_path, monkeypatch, caplog):
    root = tmp_path / "models"
    shutil.copytree(onnx_encoder.export_dir, root / onnx_encoder.export_dir.name)
    (root / onnx_encoder.export_dir.name / "model.onnx").write_bytes(b"torn")
    # The re-export is the real one's files (a real export was made by the fixture): the test is about recovery.
    monkeypatch.setattr(dedup.embed, "export_onnx",
                        lambda model, folder: shutil.copytree(onnx_encoder.export_dir, folder, dirs_exist_ok=True))
    encoder = OnnxEncoder(export_root=root)
    with caplog.at_level(logging.WARNING, logger="kvqa.dedup"):
        vectors = encoder.encode(["is there a polyp"])
    assert encoder.exported and "cannot be loaded" in caplog.text
    np.testing.assert_allclose(vectors, torch_encoder.encode(["is there a polyp"]), atol=1e-5)
    assert len(list(root.glob(".*.broken-*.tmp"))) == 1  # kept aside until stale, then removed


def test_config_without_the_extra_is_refused_in_one_line(tmp_path, monkeypatch):
    """Where onnxruntime is not installed, a config naming backend onnx stops the run before it starts
    (ConfigError: exit 2, one line), not half way through with a ModuleNotFoundError."""
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(kvqa.config.importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxruntime" else real_find_spec(name, *a))
    config = tmp_path / "config.yaml"
    config.write_text("dedup:\n  backend: onnx\n")
    with pytest.raises(ConfigError, match=r"dedup.backend onnx needs onnxruntime: .*kvqa\[onnx\]") as err:
        load_config(config)
    assert "\n" not in str(err.value)
    assert DedupConfig(backend="torch").backend == "torch"  # torch needs nothing more


def _build_slowly(folder: Path) -> None:
    (folder / "writer").write_text(str(os.getpid()))
    time.sleep(0.5)
    (folder / "done").write_text("yes")


def _publish(final: str) -> str:
    return str(publish_folder_once(Path(final), _build_slowly))


def test_concurrent_first_use_publishes_one_complete_folder(tmp_path):
    final = tmp_path / "model-x"
    with multiprocessing.get_context("fork").Pool(3) as pool:
        assert pool.map(_publish, [str(final)] * 3) == [str(final)] * 3
    assert sorted(p.name for p in final.iterdir()) == ["done", "writer"]
    assert [p.name for p in tmp_path.iterdir()] == ["model-x"]  # the losers' copies are gone


def test_failed_build_leaves_nothing_and_stale_temps_are_removed(tmp_path):
    def fail(folder: Path) -> None:
        (folder / "half").write_text("x")
        raise OSError("disk full")

    with pytest.raises(OSError):
        publish_folder_once(tmp_path / "model-y", fail)
    assert list(tmp_path.iterdir()) == []
    dead, live = tmp_path / ".model-z.dead.tmp", tmp_path / ".model-z.live.tmp"
    dead.mkdir(), live.mkdir()
    os.utime(dead, (time.time() - STALE_TEMP_AGE_S - 60,) * 2)
    publish_folder_once(tmp_path / "model-z", lambda folder: (folder / "done").write_text("yes"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model-z.live.tmp", "model-z"]


def test_onnx_runtime_encodes_on_one_thread_whatever_the_process_asks(onnx_encoder, monkeypatch):
    """ONNX Runtime's session runs its kernels on the calling thread (one intra-op thread, no inter-op pool),
    as torch does (`one_kernel_thread`): the thread count never enters its arithmetic either, and
    `encode_blocks` runs several sessions (replicas) at once instead."""
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    replica = onnx_encoder.replica()
    replica.load()
    for encoder in (onnx_encoder, replica):
        config = encoder._session.get_session_options()
        assert config.intra_op_num_threads == config.inter_op_num_threads == 1
    texts = ["is there a polyp in the image", "how many instruments are visible"]
    np.testing.assert_array_equal(replica.encode(texts), onnx_encoder.encode(texts))
