"""`kvqa publish` through the real huggingface_hub client against a loopback Hub stand-in; splits unit tests."""

from __future__ import annotations

import pandas as pd
import pytest

from conftest import run_cli, tree_digests
from hub_standin import HubStandIn
from publish import assign_splits
from publish.hub import MissingTokenError, upload_release

TOKEN = "hf_kvqaTestTokenThatMustNeverBePrinted"


def test_publish_uploads_the_release_and_never_prints_the_token(sample_run, tmp_path):
    with HubStandIn(tmp_path / "hub") as hub:
        proc = run_cli("publish", "--repo-id", "kvqa-org/kvqa-sample", "--endpoint", hub.url,
                       "--output-root", str(sample_run.parent),
                       env={"HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "0"})
    assert hub.requests[0] == "/api/repos/create"
    assert hub.validated_headers and [c["config_name"] for c in hub.validated_headers[0]["configs"]] == \
        ["default", "augmented"]
    assert tree_digests(tmp_path / "hub" / "kvqa-org" / "kvqa-sample") == tree_digests(sample_run / "release")
    assert all(h == f"Bearer {TOKEN}" for h in hub.auth_headers)
    assert TOKEN not in proc.stdout + proc.stderr
    assert not any(TOKEN.encode() in p.read_bytes() for p in sample_run.rglob("*") if p.is_file())


def test_publish_without_token_is_a_clear_error(sample_run, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(MissingTokenError, match="HF_TOKEN"):
        upload_release(sample_run / "release", "org/name")


def _images(n_per_label: dict[str, int]) -> pd.DataFrame:
    return pd.DataFrame([{"source": "s", "img_id": f"{label}-{i}", "source_label": label}
                         for label, n in n_per_label.items() for i in range(n)])


def test_splits_are_stratified_seeded_and_order_free():
    images = _images({"Polyps": 50, "Normal": 30, "Instrument": 20})
    a = assign_splits(images, 0.1, seed=42)
    b = assign_splits(images.sample(frac=1, random_state=3), 0.1, seed=42)
    pd.testing.assert_frame_equal(a, b)
    per = a[a.split == "test"].groupby("source_label").size().to_dict()
    assert per == {"Polyps": 5, "Normal": 3, "Instrument": 2}
    assert a.img_id.is_unique
    c = assign_splits(images, 0.1, seed=7)
    assert set(c[c.split == "test"].img_id) != set(a[a.split == "test"].img_id)
