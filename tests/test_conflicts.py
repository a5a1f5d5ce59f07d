"""Cross-class label conflicts (issue 10, kind 2): found at the source stage by the catalog's named rules,
counted per rule, and quarantined with the rule named, so the realizer never makes a row that only the
grounding check catches."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from conftest import SHARED
from generate import GroundingChecker, TemplateRealizer, compose_plans, realize_plans
from kvqa.catalog import DEFAULT_CATALOG_PATH, Catalog
from kvqa.config import BoxesSource, HyperKvasirSource, KvasirVQASource, PlanConfig
from sources import parse_kvasir_vqa_metadata, read_sources, units_in_facts
from sources.conflicts import REASON

# Measured on the real 1,814-row slice: one image has an instrument location but zero instruments
# (cla820gn8s6pr071uaw0qdq4x, lines 524 and 528); no other rule fires there.
REAL_SLICE_CONFLICTS = {"instrument_findings_with_zero_instruments": 1}

Q = {"abnormality": "Are there any abnormalities in the image? Check all that are present.",
     "type": "What type of polyp is present?", "size": "What is the size of the polyp?",
     "count": "How many polyps are in the image?", "removal": "Have all polyps been removed?",
     "text": "Is there text?", "procedure": "What type of procedure is the image taken from?"}


def everything_fired(parsed) -> dict[str, int]:
    return {rule: n for rule, n in parsed.label_conflicts.items() if n}


def test_real_slice_conflicts_are_counted_per_rule_and_quarantined(real_csv, catalog):
    parsed = read_sources([KvasirVQASource(metadata_csv=real_csv, image_dir=real_csv.parent)], catalog)
    assert list(parsed.label_conflicts) == list(catalog.conflicts)  # every rule reported, fired or not
    assert everything_fired(parsed) == REAL_SLICE_CONFLICTS
    q = parsed.quarantine[parsed.quarantine.reason == REASON]
    assert sorted(q.key) == ["line 524", "line 528"]
    assert q.detail.str.startswith("instrument_findings_with_zero_instruments: ").all()
    image = parsed.facts[parsed.facts.img_id == "cla820gn8s6pr071uaw0qdq4x"]
    assert {"instrument_count", "instrument_location"}.isdisjoint(image.question_class)
    assert {"polyp_count", "abnormality_presence"} <= set(image.question_class)  # the other facts stay
    assert parsed.rows_read == 1814 == units_in_facts(parsed.facts) + len(parsed.quarantine)


def test_real_hyperkvasir_and_instrument_labels_have_no_conflict(catalog):
    hk, instrument = SHARED / "hyper-kvasir", SHARED / "kvasir-instrument"
    if not (hk / "image-labels.csv").is_file():
        pytest.skip(f"real HyperKvasir labels not found at {hk}")
    parsed = read_sources([
        HyperKvasirSource(labels_csv=hk / "image-labels.csv", folders_json=hk / "folders.json",
                          boxes_json=hk / "bounding-boxes.json", image_dir=SHARED / "kvasir-seg" / "images"),
        BoxesSource(name="kvasir-instrument", boxes_json=instrument / "bboxes.json", box_labels=("instrument",),
                    image_label="instrument", image_dir=instrument)], catalog)
    assert everything_fired(parsed) == {} and REASON not in set(parsed.quarantine.reason)
    assert parsed.rows_read == 10_662 + 1_071 + 620 == units_in_facts(parsed.facts) + len(parsed.quarantine)


def write_metadata(path: Path, rows: list[tuple[str, str, str, str]]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["source", "question", "answer", "img_id"])
        w.writerows(rows)
    return path


PLANTED = [
    # A Barrett's image with polyp type and size answers: the real case.
    ("Esophagitis", Q["abnormality"], "barretts", "barrett1"),
    ("Esophagitis", Q["type"], "paris is", "barrett1"),
    ("Esophagitis", Q["size"], "5-10mm", "barrett1"),
    ("Esophagitis", Q["text"], "yes", "barrett1"),
    ("Esophagitis", Q["procedure"], "gastroscopy", "barrett1"),
    # Zero polyps, yet a polyp size and "polyps remain".
    ("Polyps", Q["count"], "0", "zero1"),
    ("Polyps", Q["size"], "11-20mm", "zero1"),
    ("Polyps", Q["removal"], "no", "zero1"),
    ("Polyps", Q["text"], "no", "zero1"),
    # Consistent: one polyp, its type, a size left as none (not a conflict), not removed.
    ("Polyps", Q["abnormality"], "polyp", "clean1"),
    ("Polyps", Q["type"], "paris ip", "clean1"),
    ("Polyps", Q["count"], "1", "clean1"),
    ("Polyps", Q["size"], "none", "clean1"),
    ("Polyps", Q["removal"], "no", "clean1"),
]


def test_a_planted_conflicting_image_is_quarantined_with_its_rule(tmp_path, catalog):
    src = KvasirVQASource(metadata_csv=write_metadata(tmp_path / "m.csv", PLANTED), image_dir=tmp_path)
    parsed = read_sources([src], catalog)
    assert everything_fired(parsed) == {"polyp_findings_without_polyp": 1, "polyp_findings_with_zero_polyps": 1}
    q = parsed.quarantine[parsed.quarantine.reason == REASON]
    by_line = dict(zip(q.key, q.detail))
    assert set(by_line) == {"line 2", "line 3", "line 4", "line 7", "line 8", "line 9"}
    assert all(by_line[f"line {n}"].startswith("polyp_findings_without_polyp: ") for n in (2, 3, 4))
    assert all(by_line[f"line {n}"].startswith("polyp_findings_with_zero_polyps: ") for n in (7, 8, 9))
    assert "abnormality_presence=['barretts'] conflicts with polyp_type=['paris is'], polyp_size=['5-10mm']" \
        in by_line["line 2"]
    assert json.loads(q[q.key == "line 3"].raw.iloc[0])[0]["source_answer"] == "paris is"
    kept = parsed.facts.groupby("img_id")["question_class"].apply(set).to_dict()
    assert kept == {"barrett1": {"procedure_type", "text_presence"}, "zero1": {"text_presence"},
                    "clean1": {"abnormality_presence", "polyp_type", "polyp_count", "polyp_size",
                               "polyp_removal_status"}}
    assert parsed.rows_read == len(PLANTED) == units_in_facts(parsed.facts) + len(parsed.quarantine)

    # Every plan of what is left realises to a grounded row. Without the rules, both images' rows are
    # caught only by the grounding check, which holds every answer to every fact of its image ("there are no
    # polyps" contradicts the image's own "polyps remain"): rows lost late, which the rules settle here.
    every = PlanConfig(level_ratios={2: 1000.0, 3: 1000.0})
    plans = compose_plans(parsed.facts, every, seed=42)
    qa, rejected = realize_plans(plans, parsed.facts, TemplateRealizer(catalog, 42), GroundingChecker(catalog))
    assert len(rejected) == 0 and len(qa) == len(plans)
    unchecked = parse_kvasir_vqa_metadata(src, catalog).facts
    plans = compose_plans(unchecked, every, seed=42)
    qa, rejected = realize_plans(plans, unchecked, TemplateRealizer(catalog, 42), GroundingChecker(catalog))
    image_of = dict(zip(plans.plan_id, plans.img_id))
    assert {image_of[k] for k in rejected.key} == {"barrett1", "zero1"}


def test_a_label_row_feeding_several_facts_is_quarantined_once(tmp_path, catalog):
    """A HyperKvasir label row feeds several classes and a box feeds count, location and size: a conflict
    takes the whole unit, so every unit ends in the facts or in the quarantine, once."""
    labels = tmp_path / "image-labels.csv"
    labels.write_text("Video file,Organ,Finding,Classification\n"
                      "hk-barrett,Upper GI,barretts,pathological-findings\n"
                      "hk-polyp,Lower GI,polyps,pathological-findings\n")
    box = {"label": "polyp", "xmin": 10, "ymin": 10, "xmax": 60, "ymax": 60}
    boxes = tmp_path / "bounding-boxes.json"
    boxes.write_text(json.dumps({i: {"height": 100, "width": 100, "bbox": [box]} for i in ("hk-barrett", "hk-polyp")}))
    parsed = read_sources([HyperKvasirSource(labels_csv=labels, boxes_json=boxes, image_dir=tmp_path)], catalog)
    assert everything_fired(parsed) == {"polyp_findings_without_polyp": 1}
    q = parsed.quarantine[parsed.quarantine.reason == REASON]
    assert sorted(q.key) == ["bounding-boxes.json:hk-barrett#1", "line 2"]
    assert set(parsed.facts.img_id) == {"hk-polyp"}  # every fact of the Barrett's image came from those units
    dropped = {r["question_class"] for raw in q.raw for r in json.loads(raw)}
    assert {"abnormality_presence", "polyp_count", "procedure_type", "abnormality_location"} <= dropped
    line = q[q.key == "line 2"].detail.iloc[0]
    assert line.startswith("polyp_findings_without_polyp: abnormality_presence=['barretts'] conflicts with ")
    assert "procedure_type=['gastroscopy'] goes with its label unit" in line
    assert parsed.rows_read == 4 == units_in_facts(parsed.facts) + len(parsed.quarantine)


def catalog_with(conflicts: dict) -> Catalog:
    data = yaml.safe_load(DEFAULT_CATALOG_PATH.read_text())
    data["conflicts"] = conflicts
    return Catalog.model_validate(data)


GOOD = {"why": "x", "when": {"class": "polyp_count", "any_of": ["0"]},
        "conflicts_with": [{"class": "polyp_type", "none_of": ["none"]}]}


@pytest.mark.parametrize("rule,message", [
    ({**GOOD, "when": {"class": "polyp_cnt", "any_of": ["0"]}}, "unknown class 'polyp_cnt'"),
    ({**GOOD, "conflicts_with": [{"class": "polyp_type", "any_of": ["paris x"]}]}, "['paris x'] not values"),
    ({**GOOD, "when": {"class": "polyp_count", "any_of": ["zero"]}}, "['zero'] not values"),
    ({**GOOD, "when": {"class": "polyp_count", "any_of": ["0"], "none_of": ["1"]}}, "not both"),
    ({**GOOD, "conflicts_with": [{"class": "polyp_count"}]}, "appears in two conditions"),
    ({**GOOD, "conflicts_with": []}, "at least 1 item"),
    ({k: v for k, v in GOOD.items() if k != "why"}, "why"),
    ({**GOOD, "unless": {}}, "Extra inputs"),
])
def test_conflict_rules_are_validated_with_the_rule_named(rule, message):
    catalog_with({"ok": GOOD})  # the valid rule loads
    with pytest.raises(ValueError) as err:
        catalog_with({"bad_rule": rule})
    assert message in str(err.value)
