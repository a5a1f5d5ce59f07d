"""HyperKvasir labels, HyperKvasir/Kvasir-Instrument boxes and Kvasir-SEG masks as sources (real files), the
grid rule on hand-checked boxes, a build with real frames, and `kvqa add-class` on a built run."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import ROOT, SHARED, run_cli
from kvqa.config import BoxesSource, HyperKvasirSource
from sources import parse_boxes_source, parse_hyperkvasir, units_in_facts
from sources.boxes import Box, grid_cells, relative_size

HK = SHARED / "hyper-kvasir"
INSTRUMENT = SHARED / "kvasir-instrument"
SEG = SHARED / "kvasir-seg"


@pytest.fixture(scope="module")
def real() -> Path:
    if not (HK / "image-labels.csv").is_file():
        pytest.skip(f"real HyperKvasir labels not found at {HK} (../shared/data is absent)")
    return SHARED


def _hk(labels: Path = HK / "image-labels.csv", **kw) -> HyperKvasirSource:
    return HyperKvasirSource(labels_csv=labels, folders_json=HK / "folders.json",
                             boxes_json=HK / "bounding-boxes.json", image_dir=SEG / "images", **kw)


def test_every_hyperkvasir_row_and_box_is_a_fact_or_quarantined(real, catalog):
    parsed = parse_hyperkvasir(_hk(), catalog)
    with open(HK / "image-labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    boxes = json.loads((HK / "bounding-boxes.json").read_text())
    n_boxes = sum(len(v["bbox"]) for v in boxes.values())
    assert (len(rows), n_boxes) == (10_662, 1_071)
    assert parsed.rows_read == len(rows) + n_boxes == units_in_facts(parsed.facts) + len(parsed.quarantine)
    facts = parsed.facts
    csv_lines = {u for f, us in zip(facts.source_file, facts.source_rows) if f == "image-labels.csv" for u in us}
    assert csv_lines == set(range(2, len(rows) + 2))  # every label row in a fact; the real file has no fault
    by = facts.set_index(["img_id", "question_class"])["values"].map(list).to_dict()
    for row in rows:
        img, finding = row["Video file"], row["Finding"]
        assert by[(img, "procedure_type")] == [{"Lower GI": "colonoscopy", "Upper GI": "gastroscopy"}[row["Organ"]]]
        if finding.startswith("ulcerative-colitis-grade-"):
            assert by[(img, "ulcerative_colitis_grade")] == [f"grade {finding.rsplit('grade-', 1)[1]}"]
            assert by[(img, "abnormality_presence")] == ["ulcerative colitis"]
        if finding in ("bbps-0-1", "bbps-2-3", "impacted-stool"):
            assert by[(img, "bowel_prep_quality")] == [{"bbps-0-1": "inadequate", "bbps-2-3": "adequate",
                                                        "impacted-stool": "impacted stool"}[finding]]
        if row["Classification"] == "anatomical-landmarks":
            assert by[(img, "retroflex_view")] == ["yes" if finding.startswith("retroflex") else "no"]
        else:
            assert (img, "retroflex_view") not in by  # not stated for other images
        if finding == "cecum":
            assert by[(img, "landmark_presence")] == ["cecum"] and (img, "abnormality_presence") not in by
    counts = Counter(facts.question_class)
    assert counts["procedure_type"] == 10_662 and counts["polyp_count"] == counts["abnormality_location"] == 1_000
    per_image = {k: str(len(v["bbox"])) for k, v in boxes.items()}
    assert {img: v[0] for (img, cls), v in by.items() if cls == "polyp_count"} == per_image
    box_facts = facts[facts.question_class == "polyp_count"]
    assert sum(len(b) for b in box_facts.boxes) == 1_071


def test_kvasir_instrument_boxes_reconcile(real, catalog):
    src = BoxesSource(name="kvasir-instrument", boxes_json=INSTRUMENT / "bboxes.json", box_labels=("instrument",),
                      image_label="instrument", image_dir=INSTRUMENT)
    parsed = parse_boxes_source(src, catalog)
    data = json.loads((INSTRUMENT / "bboxes.json").read_text())
    assert parsed.rows_read == 620 == units_in_facts(parsed.facts) + len(parsed.quarantine)
    assert len(parsed.quarantine) == 0
    counts = parsed.facts[parsed.facts.question_class == "instrument_count"].set_index("img_id")["values"]
    assert Counter(int(v[0]) for v in counts) == Counter(len(v["bbox"]) for v in data.values()) == \
        Counter({1: 565, 2: 21, 3: 3, 4: 1})
    ids = set((INSTRUMENT / "train.txt").read_text().split()) | set((INSTRUMENT / "test.txt").read_text().split())
    assert set(parsed.facts.img_id) == ids  # the official split lists exactly these 590 frames


def test_kvasir_seg_mask_boxes_are_the_hyperkvasir_boxes(real, catalog):
    """Boxes from the masks' connected components are boxes of bounding-boxes.json, to the pixel: that is how
    the five `cju…` frames are matched to their HyperKvasir ids (the JSON is keyed by UUID, not by cju id).
    One entry (90d30949…) also lists a 3-px sliver box inside its first polyp that the mask does not separate,
    so that entry counts 3 polyps where the mask shows 2."""
    src = BoxesSource(name="kvasir-seg", masks_dir=SEG / "masks", box_labels=("polyp",), image_label="polyp",
                      image_dir=SEG / "images")
    parsed = parse_boxes_source(src, catalog)
    assert parsed.rows_read == 6 == units_in_facts(parsed.facts) and len(parsed.quarantine) == 0
    matched = match_seg_frames(parsed.facts)
    assert len(matched) == 5 and len(set(matched.values())) == 5
    boxes = json.loads((HK / "bounding-boxes.json").read_text())
    extra = {cju: len(boxes[uuid]["bbox"]) for cju, uuid in matched.items()}
    assert extra == {"cju0qkwl35piu0993l0dewei2": 1, "cju0qoxqj9q6s0835b43399p4": 1, "cju0qx73cjw570799j4n5cjze": 1,
                     "cju0roawvklrq0799vmjorwfv": 3, "cju0rx1idathl0835detmsp84": 1}


def match_seg_frames(facts: pd.DataFrame) -> dict[str, str]:
    """cju frame id -> the one HyperKvasir id whose boxes include every mask box of the frame exactly."""
    boxes = json.loads((HK / "bounding-boxes.json").read_text())
    key = {k: {tuple(b[c] for c in ("xmin", "ymin", "xmax", "ymax")) for b in v["bbox"]} for k, v in boxes.items()}
    out = {}
    for img, bxs in zip(facts.img_id, facts.boxes):
        if len(bxs):
            want = {tuple(int(b[c]) for c in ("xmin", "ymin", "xmax", "ymax")) for b in bxs}
            hits = [k for k, v in key.items() if want <= v]
            assert len(hits) == 1, (img, hits)
            out[img] = hits[0]
    return out


@pytest.mark.parametrize("box, size, cells, rel", [
    # A real HyperKvasir polyp box (cju0qkwl…, 622x529): it fills most of the four upper-left cells and only a
    # 7 % sliver of upper-right and center-right.
    ((38, 5, 430, 338), (622, 529), ["upper-left", "upper-center", "center-left", "center"], "large"),
    # A real Kvasir-Instrument box (ckcx9e1ei…, 720x576): 22 % of the upper-left cell but 44 % of the box lies
    # there; 28 % of the upper-center cell.
    ((180, 20, 316, 191), (720, 576), ["upper-left", "upper-center"], "medium"),
    ((95, 10, 105, 20), (300, 300), ["upper-left", "upper-center"], "small"),   # a tip on a cell border
    ((100, 100, 200, 200), (300, 300), ["center"], "medium"),                  # exactly the center cell
    ((0, 0, 300, 300), (300, 300), ["upper-left", "upper-center", "upper-right", "center-left", "center",
                                    "center-right", "lower-left", "lower-center", "lower-right"], "large"),
])
def test_grid_rule_on_hand_checked_boxes(box, size, cells, rel):
    b = Box("polyp", *box)
    assert grid_cells(b, *size) == cells
    assert relative_size(b, *size) == rel


def test_bad_labels_and_boxes_are_quarantined_with_reasons(tmp_path, catalog):
    labels = tmp_path / "image-labels.csv"
    labels.write_text("Video file,Organ,Finding,Classification\n"
                      "a1,Lower GI,polyps,pathological-findings\n"
                      "a2,Lower GI,cecum\n"                                     # short
                      "a1,Lower GI,cecum,anatomical-landmarks\n"                # duplicate id
                      "a3,Upper GI,cecum,anatomical-landmarks\n"                # organ contradicts the folder
                      "a4,Lower GI,retroflex-rectum,anatomical-landmarks\n"
                      ",Lower GI,polyps,pathological-findings\n")              # no id: bad_id
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({
        "a1": {"height": 100, "width": 100, "bbox": [{"label": "polyp", "xmin": 1, "ymin": 1, "xmax": 50, "ymax": 50}]},
        "a4": {"height": 100, "width": 100, "bbox": [
            {"label": "polyp", "xmin": 1, "ymin": 1, "xmax": 50, "ymax": 50},
            {"label": "polyp", "xmin": 60, "ymin": 60, "xmax": 150, "ymax": 90}]},    # outside: whole entry out
        "a5": {"height": 100, "width": 100, "bbox": [{"label": "polyp", "xmin": 1, "ymin": 1, "xmax": 5, "ymax": 5}]},
        "a6": {"width": 100, "bbox": []},                                          # no height
    }))
    src = HyperKvasirSource(labels_csv=labels, folders_json=HK / "folders.json" if HK.is_dir() else None,
                            boxes_json=boxes, image_dir=tmp_path)
    parsed = parse_hyperkvasir(src, catalog)
    reasons = Counter(parsed.quarantine.reason)
    expected = {"malformed_row": 1, "bad_id": 1, "duplicate_image": 1, "bad_box": 2, "unlabelled_image": 1,
                "malformed_entry": 1}
    if HK.is_dir():
        expected["inconsistent_labels"] = 1
    assert reasons == expected
    assert parsed.rows_read == 6 + 5 == units_in_facts(parsed.facts) + len(parsed.quarantine)
    assert set(parsed.facts.img_id) == {"a1", "a4"} | ({"a3"} if not HK.is_dir() else set())
    assert not any(parsed.facts[(parsed.facts.img_id == "a4")].question_class == "polyp_count")


def test_build_from_hyperkvasir_labels_and_real_frames_loads(real, catalog, tmp_path):
    """Real HyperKvasir label rows and boxes, the real Kvasir-SEG frames under their HyperKvasir ids (linked in
    a temporary folder, found by matching mask boxes), Kvasir-SEG masks and Kvasir-Instrument boxes as two more
    sources; rows of images without a file are quarantined, the release loads with `datasets`."""
    import datasets

    seg = parse_boxes_source(BoxesSource(name="kvasir-seg", masks_dir=SEG / "masks", box_labels=("polyp",),
                                         image_label="polyp", image_dir=SEG / "images"), catalog)
    matched = match_seg_frames(seg.facts)
    frames = tmp_path / "frames"
    frames.mkdir()
    for cju, uuid in matched.items():
        os.symlink(SEG / "images" / f"{cju}.jpg", frames / f"{uuid}.jpg")
    with open(HK / "image-labels.csv", newline="") as f:
        rows = list(csv.reader(f))
    keep = [rows[0]] + [r for r in rows[1:] if r[0] in set(matched.values())] + \
        [r for r in rows[1:201:2] if r[0] not in set(matched.values())]
    (tmp_path / "labels.csv").write_text("".join(",".join(r) + "\n" for r in keep))
    config = {"run_name": "hk", "seed": 42, "output_root": str(tmp_path / "runs"),
              "sources": [
                  {"kind": "hyperkvasir", "labels_csv": str(tmp_path / "labels.csv"),
                   "folders_json": str(HK / "folders.json"), "boxes_json": str(HK / "bounding-boxes.json"),
                   "image_dir": str(frames)},
                  {"kind": "boxes", "name": "kvasir-seg", "masks_dir": str(SEG / "masks"), "box_labels": ["polyp"],
                   "image_label": "polyp", "image_dir": str(SEG / "images")},
                  {"kind": "boxes", "name": "kvasir-instrument", "boxes_json": str(INSTRUMENT / "bboxes.json"),
                   "box_labels": ["instrument"], "image_label": "instrument", "image_dir": str(INSTRUMENT)}],
              "split": {"test_fraction": 0.3}, "augment": {"enabled": False}}
    (tmp_path / "hk.yaml").write_text(yaml.safe_dump(config))
    run_cli("build", "--config", str(tmp_path / "hk.yaml"))
    run = tmp_path / "runs" / "hk"
    report = json.loads((run / "report.json").read_text())
    s = report["sources"]
    assert s["rows_read"] == s["rows_in_facts"] + s["quarantined"] == len(keep) - 1 + 1_071 + 6 + 620
    ds = datasets.load_dataset(str(run / "release"), cache_dir=str(tmp_path / "hf"))
    df = pd.concat([ds[sp].remove_columns("image").to_pandas() for sp in ds], ignore_index=True)
    assert set(df.source) == {"hyper-kvasir", "kvasir-seg"}  # no instrument frames ship in ../shared
    assert set(df[df.source == "hyper-kvasir"].img_id) == set(matched.values())
    hk = df[df.source == "hyper-kvasir"]
    assert {"procedure_type", "abnormality_presence", "polyp_count", "abnormality_location",
            "polyp_relative_size"} <= set(hk.question_class.explode())
    located = hk[hk.question_class.map(lambda c: "abnormality_location" in c)]
    assert located.boxes.map(len).min() >= 1 and {b["label"] for bs in located.boxes for b in bs} == {"polyp"}
    # The same picture under two sources' ids (a Kvasir-SEG frame and its HyperKvasir id) is in one split.
    images = pd.read_parquet(run / "stages" / "images.parquet")
    splits = pd.read_parquet(run / "stages" / "splits.parquet").merge(images, on=["source", "img_id"])
    assert splits.groupby("sha256")["split"].nunique().max() == 1
    assert splits.groupby("sha256").size().max() == 2
    q = pd.read_parquet(run / "quarantine.parquet")
    assert set(q[q.stage == "images"].reason) == {"missing_image"}
    card = (run / "release" / "README.md").read_text()
    assert "| hyper-kvasir | hyperkvasir | CC BY 4.0 |" in card and "| kvasir-seg | boxes | CC BY 4.0 |" in card
    # The `explanations` config embeds the real Kvasir-SEG masks for the rows that cite their boxes.
    ex = datasets.load_dataset(str(run / "release"), "explanations", cache_dir=str(tmp_path / "hf"))
    ex = pd.concat([ex[sp].remove_columns("image").to_pandas() for sp in ex], ignore_index=True)
    masked = ex[ex.segmentation_mask.notna()]
    assert set(masked.source) == {"kvasir-seg"} and masked.img_id.nunique() == 5
    assert all(m["bytes"] == (SEG / "masks" / f"{i}.jpg").read_bytes() for m, i in zip(masked.segmentation_mask,
                                                                                        masked.img_id))


BBPS_ENTRY = ROOT / "prompts" / "examples" / "bbps_score.yaml"


def _release_rows(release: Path) -> dict[str, str]:
    from publish.release import release_row_digests

    return release_row_digests(release)


def test_add_class_adds_pairs_and_leaves_existing_rows_byte_identical(sample_run, tmp_path):
    catalog = tmp_path / "question_classes.yaml"
    catalog.write_text((ROOT / "prompts" / "question_classes.yaml").read_text())
    config = yaml.safe_load((ROOT / "data" / "configs" / "sample.yaml").read_text())
    for src in config["sources"]:
        for k, v in list(src.items()):
            if k.endswith(("_csv", "_json", "_dir")):
                src[k] = str((ROOT / "data" / "configs" / v).resolve())
    config.update(run_name="ac", output_root=str(tmp_path / "runs"), catalog=str(catalog))
    cfg = tmp_path / "ac.yaml"
    cfg.write_text(yaml.safe_dump(config, sort_keys=False))
    # The session's sample build is this config's build (same inputs, seed and catalog bytes; the data
    # stages' keys hold no path), so a copy of it stands for `kvqa build --config ac.yaml`: add-class
    # redoes what names the run (card, exports, report) with what the new class changes.
    run = tmp_path / "runs" / "ac"
    shutil.copytree(sample_run, run, symlinks=True)
    (run / "run.json").write_text(json.dumps({"config": str(cfg)}))
    before = _release_rows(run / "release")
    proc = run_cli("add-class", "bbps_score", "--run", "ac", "--output-root", str(tmp_path / "runs"), check=False)
    assert proc.returncode == 2 and "is not in the catalog" in proc.stderr and "Traceback" not in proc.stderr
    # The README's walk-through: append the entry to the catalog, then one command.
    text = catalog.read_text()
    cut = text.index("\nlocation_grid:")
    catalog.write_text(text[:cut].rstrip("\n") + "\n\n" + BBPS_ENTRY.read_text().rstrip("\n") + "\n" + text[cut:])
    proc = run_cli("add-class", "bbps_score", "--run", "ac", "--output-root", str(tmp_path / "runs"))
    assert "existing rows unchanged" in proc.stdout
    after = _release_rows(run / "release")
    assert {q: after.get(q) for q in before} == before  # every old row, image bytes included, unchanged
    qa = pd.read_parquet(run / "stages" / "qa_dedup.parquet").set_index("qa_id")
    added = set(after) - set(before)
    assert added and all("bbps_score" in qa.loc[q, "question_class"] for q in added)
    assert Counter(int(qa.loc[q, "complexity"]) for q in added) == Counter({1: 3, 2: 3, 3: 3})
    card = (run / "release" / "README.md").read_text()
    counts = json.loads(card.split("<!-- kvqa-counts\n", 1)[1].split("\n-->", 1)[0])
    assert sum(s["question_class"].get("bbps_score", 0) for s in counts["splits"].values()) == len(added)
    left_out = sum(json.loads((run / "report.json").read_text())["release"]["augmented_left_out"].values())
    assert sum(s["rows"] for s in counts["augmented"].values()) + left_out == 10 * len(after)
    proc = run_cli("add-class", "bbps_score", "--run", "ac", "--output-root", str(tmp_path / "runs"), check=False)
    assert proc.returncode == 2 and "already in run ac" in proc.stderr
    # A later plain build of the run reproduces the same release.
    digest = hashlib.sha256(json.dumps(after, sort_keys=True).encode()).hexdigest()
    run_cli("build", "--config", str(cfg))
    assert hashlib.sha256(json.dumps(_release_rows(run / "release"), sort_keys=True).encode()).hexdigest() == digest


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "data" / "configs").glob("*.yaml")))
def test_shipped_configs_validate(name):
    from kvqa.config import load_config

    cfg = load_config(ROOT / "data" / "configs" / name)
    assert cfg.sources and all(Path(p).is_absolute() for s in cfg.sources for p in (*s.label_files, s.image_dir))


def test_a_boxes_source_takes_one_input(tmp_path):
    import pydantic

    with pytest.raises(pydantic.ValidationError, match="exactly one of boxes_json and masks_dir"):
        BoxesSource(name="x", boxes_json=tmp_path / "a.json", masks_dir=tmp_path, box_labels=("polyp",),
                    image_label="polyp", image_dir=tmp_path)


# --- Hostile ids, duplicate keys, ambiguous masks, unreadable files ------------------------------------------

def _entry(n: int = 1) -> dict:
    return {"height": 100, "width": 100,
            "bbox": [{"label": "polyp", "xmin": 10 * i, "ymin": 10, "xmax": 10 * i + 5, "ymax": 20} for i in range(n)]}


def _boxes_source(path: Path, image_dir: Path) -> BoxesSource:
    return BoxesSource(name="boxed", boxes_json=path, box_labels=("polyp",), image_label="polyp", image_dir=image_dir)


def _escape_setup(tmp_path: Path) -> tuple[Path, Path, str, str]:
    """An image folder four levels down and two images outside it that hostile keys point at."""
    from PIL import Image

    image_dir = tmp_path / "a" / "b" / "c" / "d"
    image_dir.mkdir(parents=True)
    for p in (image_dir / "good.jpg", tmp_path / "pwned.jpg", tmp_path / "abs.jpg"):
        Image.new("RGB", (100, 100), (200, 90, 90)).save(p)
    return tmp_path, image_dir, "../../../../pwned", str(tmp_path / "abs")


def test_boxes_json_keys_that_escape_are_bad_id_and_never_become_paths(tmp_path, catalog):
    from sources.images import inventory_images

    root, image_dir, traversal, absolute = _escape_setup(tmp_path)
    boxes = root / "boxes.json"
    boxes.write_text(json.dumps({"good": _entry(), traversal: _entry(2), absolute: _entry(), "ok\n": _entry()}))
    parsed = parse_boxes_source(_boxes_source(boxes, image_dir), catalog)
    assert parsed.rows_read == 5 == units_in_facts(parsed.facts) + len(parsed.quarantine)
    assert set(parsed.facts.img_id) == {"good"}
    q = parsed.quarantine
    assert list(q.reason) == ["bad_id"] * 4
    assert list(q.key) == [f"boxes.json:{traversal}#2", f"boxes.json:{traversal}#3", f"boxes.json:{absolute}#4",
                           "boxes.json:ok\n#5"]
    images, bad = inventory_images(parsed.facts, [_boxes_source(boxes, image_dir)])
    assert list(images.img_id) == ["good"] and len(bad) == 0
    # The image stage refuses such an id too, whoever hands it over: nothing outside image_dir is looked at.
    wanted = pd.DataFrame({"source": ["boxed"] * 2, "img_id": [traversal, absolute]})
    images, bad = inventory_images(wanted, [_boxes_source(boxes, image_dir)])
    assert len(images) == 0 and list(bad.reason) == ["bad_id", "bad_id"] and set(bad.raw) == {""}


def test_hyperkvasir_boxes_keys_that_escape_are_bad_id(tmp_path, catalog):
    root, image_dir, traversal, absolute = _escape_setup(tmp_path)
    labels = root / "image-labels.csv"
    labels.write_text("Video file,Organ,Finding,Classification\n"
                      "good,Lower GI,polyps,pathological-findings\n"
                      "../x,Lower GI,polyps,pathological-findings\n")
    boxes = root / "bounding-boxes.json"
    boxes.write_text(json.dumps({"good": _entry(), traversal: _entry(), absolute: _entry(3)}))
    parsed = parse_hyperkvasir(HyperKvasirSource(labels_csv=labels, boxes_json=boxes, image_dir=image_dir), catalog)
    assert parsed.rows_read == 2 + 5 == units_in_facts(parsed.facts) + len(parsed.quarantine)
    assert Counter(parsed.quarantine.reason) == {"bad_id": 1 + 4}
    assert set(parsed.facts.img_id) == {"good"}


def test_duplicate_json_keys_quarantine_every_entry(tmp_path, catalog):
    """`json` keeps the last of two equal keys; both entries are quarantined instead (which is right is
    unknown), in a boxes source and in HyperKvasir's bounding-boxes.json."""
    one, two = json.dumps(_entry(1)), json.dumps(_entry(2))
    boxes = tmp_path / "bounding-boxes.json"
    boxes.write_text(f'{{"dup": {one}, "other": {one}, "dup": {two}}}')
    parsed = parse_boxes_source(_boxes_source(boxes, tmp_path), catalog)
    assert parsed.rows_read == 4 == units_in_facts(parsed.facts) + len(parsed.quarantine)
    assert list(parsed.quarantine.key) == ["bounding-boxes.json:dup#1", "bounding-boxes.json:dup#3",
                                           "bounding-boxes.json:dup#4"]
    assert set(parsed.quarantine.reason) == {"duplicate_image"} and set(parsed.facts.img_id) == {"other"}
    labels = tmp_path / "image-labels.csv"
    labels.write_text("Video file,Organ,Finding,Classification\n"
                      "dup,Lower GI,polyps,pathological-findings\nother,Lower GI,polyps,pathological-findings\n")
    parsed = parse_hyperkvasir(HyperKvasirSource(labels_csv=labels, boxes_json=boxes, image_dir=tmp_path), catalog)
    assert parsed.rows_read == 2 + 4 == units_in_facts(parsed.facts) + len(parsed.quarantine)
    assert Counter(parsed.quarantine.reason) == {"duplicate_image": 3}
    assert "polyp_count" not in set(parsed.facts[parsed.facts.img_id == "dup"].question_class)


def _mask(path: Path) -> None:
    from PIL import Image

    m = Image.new("L", (120, 90), 0)
    m.paste(255, (10, 10, 60, 50))
    m.save(path, format="BMP" if path.suffix == ".bmp" else "PNG")


def test_mask_files_with_bad_or_shared_ids_are_quarantined(tmp_path, catalog):
    masks = tmp_path / "masks"
    masks.mkdir()
    for name in ("...png", "x.png", "x.bmp", "good.png", ".DS_Store"):
        _mask(masks / name) if name != ".DS_Store" else (masks / name).write_bytes(b"\0\1")
    src = BoxesSource(name="seg", masks_dir=masks, box_labels=("polyp",), image_label="polyp", image_dir=tmp_path)
    parsed = parse_boxes_source(src, catalog)
    assert parsed.rows_read == 5 == units_in_facts(parsed.facts) + len(parsed.quarantine)
    assert dict(zip(parsed.quarantine.key, parsed.quarantine.reason)) == {
        "...png": "bad_id", ".DS_Store": "bad_id", "x.bmp": "ambiguous_image", "x.png": "ambiguous_image"}
    assert set(parsed.facts.img_id) == {"good"}


@pytest.mark.parametrize("content, line, words", [
    (b"", None, "empty file"),
    (b"{", 1, "not JSON"),
    (b'{"a": 1,\n "b": }', 2, "not JSON"),
    (b"[1, 2]", None, "got a JSON list"),
    (b"{}", None, "got an empty object"),
    (b'{"a": "\xe9"}', 1, "not UTF-8"),
    (b"\x89PNG\r\n\x1a\n\x00\x00", 1, "not UTF-8"),
    (b"[" * 100_000, None, "nested too deeply"),
])
def test_unreadable_boxes_json_is_one_line_error(tmp_path, catalog, content, line, words):
    from sources import LabelFileError

    path = tmp_path / "boxes.json"
    path.write_bytes(content)
    with pytest.raises(LabelFileError) as err:
        parse_boxes_source(_boxes_source(path, tmp_path), catalog)
    message = str(err.value)
    assert message.startswith(f"{path}:{line}: " if line else f"{path}: ") and words in message
    assert "\n" not in message and len(message) < 400


def test_unreadable_folders_json_and_masks_dir_are_one_line_errors(tmp_path, catalog):
    from sources import LabelFileError

    labels = tmp_path / "image-labels.csv"
    labels.write_text("Video file,Organ,Finding,Classification\na1,Lower GI,polyps,pathological-findings\n")
    folders = tmp_path / "folders.json"
    for content, words in [("not json", "not JSON"), ('{"a": 1}', "non-empty list"), ("[]", "non-empty list"),
                           ('["labeled-images/x"]', "unexpected folder"), ("[7]", "unexpected folder")]:
        folders.write_text(content)
        with pytest.raises(LabelFileError, match=words) as err:
            parse_hyperkvasir(HyperKvasirSource(labels_csv=labels, folders_json=folders, image_dir=tmp_path), catalog)
        assert str(err.value).startswith(f"{folders}") and "\n" not in str(err.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    for masks_dir, words in [(labels, "is a file"), (empty, "holds no files"), (tmp_path / "nope", "cannot be listed")]:
        src = BoxesSource(name="seg", masks_dir=masks_dir, box_labels=("polyp",), image_label="polyp",
                          image_dir=tmp_path)
        with pytest.raises(LabelFileError, match=words):
            parse_boxes_source(src, catalog)


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 1.5, True, "3"])
def test_non_integer_box_sizes_are_malformed_entries(tmp_path, catalog, value):
    path = tmp_path / "boxes.json"
    path.write_text(json.dumps({"a1": {**_entry(), "width": value}, "a2": _entry()}))  # json writes Infinity/NaN
    parsed = parse_boxes_source(_boxes_source(path, tmp_path), catalog)
    assert dict(zip(parsed.quarantine.key, parsed.quarantine.reason)) == {"boxes.json:a1#1": "malformed_entry"}


def test_build_with_hostile_ids_writes_nothing_outside_the_run_folder(tmp_path):
    """End to end, augmented track included: a boxes JSON whose keys climb out of image_dir (and out of
    augmented/<source>/) and an absolute key used to read images outside image_dir and write their ten
    variants outside the run folder. The run completes, those boxes are quarantined as `bad_id`, no file
    outside the run folder is created or changed. (Masks are checked at the source: a masks source in a
    build with augmentation hangs the augment pool until cv2's threads are handled, a separate fix.)"""
    from PIL import Image

    root, image_dir, traversal, absolute = _escape_setup(tmp_path)
    good = [f"g{i:02d}" for i in range(12)]
    for img in good:
        Image.new("RGB", (100, 100), (150 + 8 * int(img[1:]), 90, 90)).save(image_dir / f"{img}.jpg")
    boxes = root / "boxes.json"
    boxes.write_text(json.dumps({**{img: _entry(1 + int(img[1:]) % 3) for img in good},
                                 traversal: _entry(2), absolute: _entry()}))
    config = {"run_name": "hostile", "seed": 42, "output_root": str(root / "runs"), "split": {"test_fraction": 0.3},
              "sources": [
                  {"kind": "boxes", "name": "boxed", "boxes_json": str(boxes), "box_labels": ["polyp"],
                   "image_label": "polyp", "image_dir": str(image_dir)}]}
    cfg = root / "hostile.yaml"
    cfg.write_text(yaml.safe_dump(config, sort_keys=False))
    outside = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    run_cli("build", "--config", str(cfg))
    run = root / "runs" / "hostile"
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and "runs" not in p.relative_to(root).parts} \
        == outside
    assert sorted(p.name for p in root.iterdir()) == ["a", "abs.jpg", "boxes.json", "hostile.yaml", "pwned.jpg", "runs"]
    assert sorted(p.name for p in (run / "augmented").iterdir()) == ["boxed"]
    assert sorted(p.name for p in (run / "augmented" / "boxed").iterdir()) == good
    assert all(len(list((run / "augmented" / "boxed" / img).iterdir())) == 10 for img in good)
    q = pd.read_parquet(run / "quarantine.parquet")
    assert sorted(zip(q.stage, q.key, q.reason)) == sorted([
        ("sources", f"boxes.json:{traversal}#{u}", "bad_id") for u in (25, 26)] + [
        ("sources", f"boxes.json:{absolute}#27", "bad_id")])
    report = json.loads((run / "report.json").read_text())
    assert report["sources"]["rows_read"] == report["sources"]["rows_in_facts"] + report["sources"]["quarantined"]
    release = pd.concat([pd.read_parquet(p, columns=["source", "img_id"])
                         for p in (run / "release" / "data").glob("*.parquet")])
    assert set(release.img_id) == set(good)
