"""`kvqa publish` through the real huggingface_hub client against a loopback Hub stand-in; splits unit tests."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

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
    repo = tree_digests(tmp_path / "hub" / "kvqa-org" / "kvqa-sample")
    assert repo.pop(".gitattributes") and repo == tree_digests(sample_run / "release")
    assert [c.summary for c in hub.commits("kvqa-org/kvqa-sample")] == ["initial commit", "kvqa release"]
    assert all(h == f"Bearer {TOKEN}" for h in hub.auth_headers)
    assert TOKEN not in proc.stdout + proc.stderr
    assert not any(TOKEN.encode() in p.read_bytes() for p in sample_run.rglob("*") if p.is_file())


def write_release_folder(folder: Path, shards: int, rows_per_shard: int, first_id: int) -> list[str]:
    """A minimal release folder: `data/train-NNNNN-of-NNNNN.parquet` shards and a card that globs them."""
    card = {"configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*"}]}]}
    (folder / "data").mkdir(parents=True)
    (folder / "README.md").write_text(f"---\n{yaml.safe_dump(card)}---\n\n# test release\n")
    ids = []
    for i in range(shards):
        rows = [f"qa-{first_id + i * rows_per_shard + j}" for j in range(rows_per_shard)]
        pd.DataFrame({"qa_id": rows, "question": "q?"}).to_parquet(
            folder / "data" / f"train-{i:05d}-of-{shards:05d}.parquet", index=False)
        ids += rows
    return ids


def test_a_second_publish_replaces_the_first_in_one_commit(tmp_path, monkeypatch):
    """3 shards, then 2: the repo holds exactly the 2 (no stale shard for `data/train-*` to load twice)."""
    from datasets import load_dataset
    from huggingface_hub import constants

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the tests run offline; the stand-in is local
    write_release_folder(tmp_path / "r1", shards=3, rows_per_shard=4, first_id=0)
    second = write_release_folder(tmp_path / "r2", shards=2, rows_per_shard=5, first_id=100)
    repo_id = "kvqa-org/replace"
    with HubStandIn(tmp_path / "hub") as hub:
        upload_release(tmp_path / "r1", repo_id, endpoint=hub.url)
        assert hub.files(repo_id) == [".gitattributes", "README.md", *[f"data/train-0000{i}-of-00003.parquet"
                                                                       for i in range(3)]]
        upload_release(tmp_path / "r2", repo_id, endpoint=hub.url)
        commits = hub.commits(repo_id)
        upload_release(tmp_path / "r2", repo_id, endpoint=hub.url)  # nothing changed: no commit
        assert hub.commits(repo_id) == commits
    assert hub.files(repo_id) == [".gitattributes", "README.md", "data/train-00000-of-00002.parquet",
                                  "data/train-00001-of-00002.parquet"]
    # One commit per publish, each on top of the previous head; the second deletes the old shards.
    assert [c.summary for c in commits] == ["initial commit", "kvqa release", "kvqa release"]
    assert [c.parent for c in commits[1:]] == [c.oid for c in commits[:-1]]
    assert commits[2].deleted == [f"data/train-0000{i}-of-00003.parquet" for i in range(3)]
    loaded = load_dataset(str(tmp_path / "hub" / repo_id), split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert sorted(loaded["qa_id"]) == sorted(second)


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


SECRETS = ("alice", "hunter2", "qk-123", "eb-456", "nested-789", "Bearer zz", "hf-000")
SECRET_CONFIG = """\
run_name: secret
output_root: runs
sources:
  - kind: kvasir_vqa
    metadata_csv: labels/metadata.csv
    image_dir: /mnt/private/kvasir/images
generate:
  backend: openai
  llm:
    base_url: http://alice:hunter2@gpu-box:8000/v1?api_key=qk-123&api-version=2024-06-01
    extra_body:
      top_p: 0.9
      api_key: eb-456
      chat_template_kwargs: {enable_thinking: false}
      metadata: [{auth: {token: nested-789}}, {Authorization: Bearer zz}]
    vllm_engine: {hf_token: hf-000, download_dir: /scratch/weights, dtype: bfloat16}
    cache_dir: /var/cache/kvqa-llm
"""


def secret_config(folder: Path):
    from kvqa.config import load_config

    folder.mkdir(parents=True)
    (folder / "cfg.yaml").write_text(SECRET_CONFIG)
    return load_config(folder / "cfg.yaml")


def test_public_config_redacts_credentials_and_machine_paths(tmp_path):
    from kvqa.config import public_config_yaml

    text = public_config_yaml(secret_config(tmp_path / "a"), tmp_path / "a")
    assert not [s for s in SECRETS if s in text]
    assert str(tmp_path) not in text and not any(p in text for p in ("/mnt/", "/scratch/", "/var/"))
    public = yaml.safe_load(text)
    llm = public["generate"]["llm"]
    assert llm["base_url"] == "http://<redacted>@gpu-box:8000/v1?api_key=<redacted>&api-version=2024-06-01"
    assert llm["extra_body"] == {"top_p": 0.9, "api_key": "<redacted>",
                                 "chat_template_kwargs": {"enable_thinking": False},
                                 "metadata": [{"auth": "<redacted>"}, {"Authorization": "<redacted>"}]}
    assert llm["vllm_engine"] == {"hf_token": "<redacted>", "download_dir": "weights", "dtype": "bfloat16"}
    assert llm["api_key_env"] == "OPENAI_API_KEY" and llm["cache_dir"] == "kvqa-llm"
    source = public["sources"][0]
    assert (source["metadata_csv"], source["image_dir"]) == ("labels/metadata.csv", "images")
    assert "output_root" not in public  # where this machine keeps runs, not what the release is
    # The same config in another folder, deeper: the same text.
    assert public_config_yaml(secret_config(tmp_path / "b" / "deeper"), tmp_path / "b" / "deeper") == text


def test_a_card_shows_no_secret_and_no_absolute_path(tmp_path):
    from kvqa.config import public_config_yaml
    from publish import render_card

    cfg = secret_config(tmp_path / "cfg")
    release = tmp_path / "release"
    (release / "data").mkdir(parents=True)
    pd.DataFrame({"img_id": ["a", "b"], "complexity": [1, 2], "question_class": [["text_presence"]] * 2,
                  "source": ["kvasir-vqa"] * 2, "answer": ["No text.", "Two polyps, no text."]}).to_parquet(
        release / "data" / "train-00000-of-00001.parquet")
    card, _ = render_card(release, {"train": [{"file": "data/train-00000-of-00001.parquet"}]}, pretty_name="t",
                          license="cc-by-4.0", sources=[{"name": "kvasir-vqa", "kind": "kvasir_vqa", "license": "x"}],
                          generator="openai:Qwen/Qwen3-8B", config_yaml=public_config_yaml(cfg, tmp_path / "cfg"),
                          quarantine=pd.DataFrame())
    assert "## Configuration used" in card and "http://<redacted>@gpu-box:8000/v1" in card
    assert not [s for s in SECRETS if s in card]
    assert str(tmp_path) not in card and "/mnt/" not in card and "/var/" not in card


def test_an_invalid_config_error_shows_no_secret(tmp_path):
    """pydantic's own message echoes the failing input (here the whole `llm:` section)."""
    from kvqa.config import load_config
    from kvqa.errors import ConfigError

    (tmp_path / "bad.yaml").write_text(SECRET_CONFIG.replace("    cache_dir:", "    api_key: sk-typed-in-the-config\n"
                                                             "    timeout_s: -1\n    cache_dir:"))
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "bad.yaml")
    assert "sk-typed-in-the-config" in str(err.value.__context__)  # pydantic's own text had it
    message = str(err.value)
    assert "generate.llm.api_key: unknown key" in message and "timeout_s" in message
    assert "sk-typed-in-the-config" not in message and not [s for s in SECRETS if s in message]
    proc = run_cli("build", "--config", str(tmp_path / "bad.yaml"), check=False)
    assert proc.returncode == 2 and "generate.llm.api_key" in proc.stderr
    assert "sk-typed-in-the-config" not in proc.stderr + proc.stdout
