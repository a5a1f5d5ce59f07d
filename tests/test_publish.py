"""`kvqa publish` through the real huggingface_hub client against a loopback Hub stand-in; splits unit tests."""

from __future__ import annotations

import re
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
        ["default", "augmented", "explanations"]
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


# --- Release layout: each image's bytes stored once per row group (dictionary-encoded `image.bytes`) ---

def image_column_chunks(shard: Path) -> list:
    """The `image.bytes` column chunk of each row group of a shard."""
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(shard).metadata
    return [next(rg.column(j) for j in range(rg.num_columns) if rg.column(j).path_in_schema == "image.bytes")
            for rg in (meta.row_group(i) for i in range(meta.num_row_groups))]


def assert_images_stored_once_per_row_group(shard: Path) -> None:
    """Every row group's image column is one dictionary page of its distinct images plus index pages: no
    PLAIN fallback (which would store a repeated image again per row) and no image twice."""
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(shard)
    for i, chunk in enumerate(image_column_chunks(shard)):
        assert chunk.has_dictionary_page and "RLE_DICTIONARY" in chunk.encodings, (shard.name, i)
        images = parquet.read_row_group(i, columns=["image"]).column("image").combine_chunks().field("bytes")
        distinct = {bytes(b.as_py()) for b in images}
        # Dictionary page: each distinct image once with a 4-byte length prefix, + a page header. Data pages:
        # at most 4 bytes of index and definition levels per row, + page headers.
        assert chunk.total_compressed_size <= sum(len(b) + 4 for b in distinct) + 5 * chunk.num_values + 1024, \
            (shard.name, i)


def string_bytes(table) -> int:
    """UTF-8 bytes of a table's string columns (the text a release carries besides its images)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    return sum(pc.sum(pc.binary_length(table.column(c))).as_py() or 0 for c in table.column_names
               if pa.types.is_string(table.schema.field(c).type))


@pytest.mark.parametrize("config", ["default", "augmented"])
def test_the_sample_release_stores_each_image_once(sample_run, config, tmp_path):
    """The release's bytes are its distinct images and text, not images × rows (the old layout was 16× and
    19× on the sample); every row's image comes back through `datasets`, streaming too, byte-identical to
    its source file."""
    import hashlib

    import datasets
    import pyarrow.parquet as pq

    release = sample_run / "release"
    folder = "data" if config == "default" else "augmented"
    shards = sorted((release / folder).glob("*.parquet"))
    distinct: dict[str, int] = {}
    text = 0
    for shard in shards:
        table = pq.read_table(shard)
        for b in table.column("image").combine_chunks().field("bytes").to_pylist():
            distinct[hashlib.sha256(b).hexdigest()] = len(b)
        text += string_bytes(table)
        assert_images_stored_once_per_row_group(shard)
    assert sum(s.stat().st_size for s in shards) <= 1.2 * (sum(distinct.values()) + text)

    if config == "default":
        images = pd.read_parquet(sample_run / "stages" / "images.parquet")
        source_file = {(r.source, r.img_id): Path(r.path) for r in images.itertuples()}
        key = ("source", "img_id")
    else:
        aug = pd.read_parquet(sample_run / "stages" / "augmentations.parquet")
        source_file = {(r.source, r.img_id, r.variant): sample_run / r.output_path for r in aug.itertuples()}
        key = ("source", "img_id", "variant")
    digest = {k: hashlib.sha256(p.read_bytes()).hexdigest() for k, p in source_file.items()}
    loaded = datasets.load_dataset(str(release), config, cache_dir=str(tmp_path / "hf"))
    streamed = datasets.load_dataset(str(release), config, streaming=True)
    assert set(loaded) == set(streamed) == {"train", "test"}
    for split in ("train", "test"):
        rows = loaded[split].cast_column("image", datasets.Image(decode=False))
        seen = [(r["qa_id"], hashlib.sha256(r["image"]["bytes"]).hexdigest()) for r in rows]
        assert [digest[tuple(r[k] for k in key)] for r in rows.remove_columns("image")] == [d for _, d in seen]
        stream_rows = streamed[split].cast_column("image", datasets.Image(decode=False))
        assert [(r["qa_id"], hashlib.sha256(r["image"]["bytes"]).hexdigest()) for r in stream_rows] == seen
    row = loaded["test"][0]
    assert row["image"].size == (row["image"].width, row["image"].height) and row["image"].width > 0


def jpeg_with_padding(seed: int, n_bytes: int) -> bytes:
    """A small valid JPEG made `n_bytes` long by a trailer after its end marker (decoders ignore it);
    random, so no two images share content and nothing compresses."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue() + rng.bytes(max(0, n_bytes - buf.tell()))


def synthetic_rows(folder: Path, rows_per_image: list[int], image_bytes: list[int]) -> pd.DataFrame:
    """Release rows (one split, grouped by image) over image files written here."""
    folder.mkdir(parents=True)
    rows = []
    for k, (n_rows, size) in enumerate(zip(rows_per_image, image_bytes)):
        path = folder / f"img{k}.jpg"
        path.write_bytes(jpeg_with_padding(k, size))
        rows += [{"img_id": f"img{k}", "complexity": 1, "question": f"q{j}?", "answer": "a", "original": "[]",
                  "question_class": ["polyp_count"], "qa_id": f"qa-{k}-{j}", "source": "s", "source_label": "l",
                  "generator": "g", "generator_version": "v", "prompt_hash": "h", "boxes": [], "split": "train",
                  "path": str(path), "n_bytes": path.stat().st_size, "image_name": f"img{k}.jpg"}
                 for j in range(n_rows)]
    return pd.DataFrame(rows)


def write_synthetic(rows: pd.DataFrame, out: Path, **config) -> list[Path]:
    from kvqa.config import PublishConfig
    from publish.release import RELEASE_FEATURES, ROW_GROUP_IMAGE_BYTES, write_config_shards

    cap = config.pop("image_bytes_cap", ROW_GROUP_IMAGE_BYTES)
    files = write_config_shards(rows, out, "data", RELEASE_FEATURES, PublishConfig(**config), image_bytes_cap=cap)
    assert [f["rows"] for f in files["train"]] and sum(f["rows"] for f in files["train"]) == len(rows)
    return [out / f["file"] for f in files["train"]]


def test_an_image_with_more_rows_than_a_row_group_is_stored_once_per_row_group(tmp_path):
    """img1 has 11 rows, row groups hold 4: its bytes are in 3 row groups, once each (not 11 times); the
    other images are not split; every row comes back through `datasets` with its own image."""
    import datasets
    import pyarrow.parquet as pq

    rows = synthetic_rows(tmp_path / "img", rows_per_image=[2, 11, 3], image_bytes=[3000, 4000, 5000])
    [shard] = write_synthetic(rows, tmp_path / "release", row_group_rows=4)
    meta = pq.ParquetFile(shard).metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [2, 4, 4, 3, 3]
    data = shard.read_bytes()
    assert [data.count(Path(p).read_bytes()) for p in sorted(set(rows["path"]))] == [1, 3, 1]
    assert_images_stored_once_per_row_group(shard)
    card = {"configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*"}]}]}
    (tmp_path / "release" / "README.md").write_text(f"---\n{yaml.safe_dump(card)}---\n")
    for streaming in (False, True):
        ds = datasets.load_dataset(str(tmp_path / "release"), split="train", streaming=streaming,
                                   cache_dir=str(tmp_path / "hf"))
        got = [(r["qa_id"], r["image"]["bytes"]) for r in ds.cast_column("image", datasets.Image(decode=False))]
        assert got == [(q, Path(p).read_bytes()) for q, p in zip(rows["qa_id"], rows["path"])]


def test_row_groups_are_cut_by_distinct_image_bytes_and_never_fall_back_to_plain(tmp_path):
    """Four 400 kB images × 300 rows and a 1.2 MB one × 2, row groups of up to 2,000 rows. Arrow checks a
    dictionary's size after each batch of 1,024 values and writes the rest of the column chunk PLAIN once it
    passes the limit (1 MiB by default): one row group of 1,202 rows holds 2.8 MB of distinct images, so the
    writer raises the limit to fit; with a 1 MiB cap the row groups are cut at 2 images (0.8 MB), and the
    image over the cap is a row group of its own. Each image's bytes are in the file once either way."""
    import pyarrow.parquet as pq

    rows = synthetic_rows(tmp_path / "img", rows_per_image=[300] * 4 + [2], image_bytes=[400_000] * 4 + [1_200_000])
    files = {p: Path(p).read_bytes() for p in dict.fromkeys(rows["path"])}
    for cap, groups in ((None, [1202]), (1 << 20, [600, 600, 2])):
        out = tmp_path / f"release-{cap}"
        [shard] = write_synthetic(rows, out, row_group_rows=2000, **({"image_bytes_cap": cap} if cap else {}))
        meta = pq.ParquetFile(shard).metadata
        assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == groups
        assert_images_stored_once_per_row_group(shard)
        data = shard.read_bytes()
        assert [data.count(b) for b in files.values()] == [1] * len(files)


def test_shards_are_capped_by_their_distinct_image_bytes(tmp_path):
    """Six 50 kB images × 5 rows, row groups of 10 rows (2 images, ~100 kB), shards of ≤ 120 kB: one row
    group per shard, each file under the cap (counting image bytes per row, as before, gave 2 rows a shard)."""
    rows = synthetic_rows(tmp_path / "img", rows_per_image=[5] * 6, image_bytes=[50_000] * 6)
    shards = write_synthetic(rows, tmp_path / "release", row_group_rows=10, max_shard_bytes=120_000)
    assert [s.name for s in shards] == [f"train-0000{i}-of-00003.parquet" for i in range(3)]
    assert all(100_000 < s.stat().st_size <= 120_000 for s in shards)


def test_card_table_cells_escape_pipes_and_line_breaks():
    """An LLM question with `|` or a line break stays in its cell: the table keeps its columns."""
    from publish.card import _table

    table = _table(["question", "n"], [["Is there a | b?\nOr c", 1], ["a \\| b", 2]])
    body = table.splitlines()
    assert len(body) == 4
    for line in body[2:]:
        cells = [c for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        assert len(cells) == 2, line
    assert "Is there a \\| b? Or c" in table and "a \\\\\\| b" in table


def test_card_counts_images_by_source_and_id():
    """Two sources can use one id (Kvasir-SEG frames under their HyperKvasir ids): they are two images."""
    from publish.card import card_counts

    rows = pd.DataFrame({"source": ["hyper-kvasir", "kvasir-seg", "kvasir-seg"], "img_id": ["a", "a", "a"],
                         "complexity": [1, 1, 2], "question_class": [["polyp_count"]] * 3, "answer": ["one"] * 3})
    assert card_counts({"train": rows})["splits"]["train"]["images"] == 2


def test_card_lists_classes_and_levels_with_no_test_row():
    from publish.card import _missing_from_test, card_counts

    def rows(classes, levels):
        return pd.DataFrame({"source": "s", "img_id": [f"i{n}" for n in range(len(levels))], "complexity": levels,
                             "question_class": classes, "answer": ["yes"] * len(levels)})

    counts = card_counts({"train": rows([["a"], ["b", "c"]], [1, 2]), "test": rows([["a"]], [1])})
    assert counts["missing_from_test"] == {"complexity": [2], "question_class": ["b", "c"]}
    text = "\n".join(_missing_from_test(counts["missing_from_test"]))
    assert "- level 2" in text and "- `b`" in text and "- `c`" in text and "`a`" not in text
    full = card_counts({"train": rows([["a"]], [1]), "test": rows([["a"]], [1])})
    assert _missing_from_test(full["missing_from_test"]) == []
