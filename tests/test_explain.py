"""Explanations (Medico 2026 subtask 2): grounded textual explanations, source boxes and masks as visual
explanations, the `explanations` release config, the validation subset, the reference submission and the
submission validator. On the sample build and on the real HyperKvasir boxes / Kvasir-SEG masks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from conftest import SHARED
from explain import (TemplateExplainer, check_explanation, explain_items, explain_rows, load_phrasings,
                     mask_index)
from explain.explain import Explained
from generate.grounding import GroundingChecker
from kvqa.config import ExplainConfig

HK = SHARED / "hyper-kvasir"
SEG = SHARED / "kvasir-seg"


@pytest.fixture(scope="module")
def phrasings(catalog):
    return load_phrasings(ExplainConfig().phrasings, catalog)


def _stages(run: Path, *names: str) -> list[pd.DataFrame]:
    return [pd.read_parquet(run / "stages" / f"{n}.parquet") for n in names]


def _box_list(boxes) -> list[list[int]]:
    return [[int(b["xmin"]), int(b["ymin"]), int(b["xmax"]), int(b["ymax"])] for b in boxes]


def _visual_boxes(visual) -> list[list[int]]:
    assert all(v["type"] == "bounding_box" and len(v["data"]) == 1 for v in visual)
    return [[int(x) for x in v["data"][0]] for v in visual]


def test_sample_explanations_are_grounded_and_show_exactly_the_source_boxes(sample_run, catalog, phrasings):
    explanations, qa, plans, facts, rejected = _stages(sample_run, "explanations", "qa_dedup", "plans", "facts",
                                                       "quarantine_explain")
    assert len(explanations) == len(qa) and len(rejected) == 0  # template explanations are grounded by design
    checker = GroundingChecker(catalog)
    items = {i.qa_id: i for i in explain_items(qa, plans, facts, phrasings, {})}
    boxes_by_fact = dict(zip(facts.fact_id, facts.boxes))
    with_boxes = 0
    for row in explanations.itertuples(index=False):
        item = items[row.qa_id]
        assert check_explanation(checker, row.explanation, item) is None, row.explanation
        assert list(row.cited_classes) == [f.question_class for f in item.cited]
        source = []
        for f in item.cited:  # the boxes of the facts the explanation cites, as the source labels have them
            source += [b for b in _box_list(boxes_by_fact[f.fact_id]) if b not in source]
        assert _visual_boxes(row.visual_explanation) == source
        with_boxes += bool(source)
    assert with_boxes > 0  # the sample's HyperKvasir polyp boxes are shown
    # The release's `explanations` config: the released rows, each with its explanation, loadable.
    import datasets

    ds = datasets.load_dataset(str(sample_run / "release"), "explanations", cache_dir=str(sample_run.parent / "hf-x"))
    rows = pd.concat([ds[s].remove_columns("image").to_pandas() for s in ds], ignore_index=True)
    default = datasets.load_dataset(str(sample_run / "release"), cache_dir=str(sample_run.parent / "hf-x"))
    assert sorted(rows.qa_id) == sorted(q for s in default for q in default[s]["qa_id"])
    by_id = explanations.set_index("qa_id")
    assert all(by_id.loc[r.qa_id, "explanation"] == r.explanation for r in rows.itertuples())
    card = (sample_run / "release" / "README.md").read_text()
    assert "config_name: explanations" in card and "## Explanations (Medico 2026 subtask 2)" in card


class PlantedExplainer:
    """Returns the given texts: stands in for an LLM whose explanations contradict the labels."""

    name, version = "planted", "planted-v1"

    def __init__(self, texts: dict[str, str]):
        self.texts = texts

    def explain(self, items):
        return [Explained(i.qa_id, self.texts[i.qa_id]) for i in items]


def test_planted_contradicting_explanations_are_rejected(sample_run, catalog, phrasings):
    qa, plans, facts = _stages(sample_run, "qa_dedup", "plans", "facts")
    items = explain_items(qa, plans, facts, phrasings, {})
    template = TemplateExplainer(catalog, phrasings, 42)

    def first(cls: str, ok=lambda f: True):
        return next(i for i in items if len(i.facts) == 1 and i.facts[0].question_class == cls and ok(i.facts[0]))

    two_polyps = first("polyp_count", lambda f: f.values[0] == "2")
    colour = first("abnormality_color", lambda f: "red" in f.values and "yellow" not in f.values)
    text_yes = first("text_presence", lambda f: f.values[0] == "yes")
    no_colour = first("procedure_type")  # its explanation cites no colour fact
    good = {i.qa_id: template.explain_one(i).text for i in (two_polyps, colour, text_yes, no_colour)}
    planted = {
        two_polyps.qa_id: good[two_polyps.qa_id].replace("Two", "Three").replace("two", "three")
        .replace("2 polyps", "3 polyps"),
        colour.qa_id: good[colour.qa_id].replace("red", "yellow"),
        text_yes.qa_id: "No text is overlaid on the frame. " + good[text_yes.qa_id].split(". ", 1)[1],
        no_colour.qa_id: good[no_colour.qa_id].rstrip(".") + ", and the mucosa looks red.",
    }
    assert all(planted[k] != good[k] for k in planted)
    keep = qa[qa.qa_id.isin(planted)]
    table, rejected = explain_rows(keep, plans, facts, PlantedExplainer(planted), GroundingChecker(catalog), phrasings)
    assert len(table) == 0 and len(rejected) == 4
    reasons = dict(zip(rejected.key, rejected.reason))
    assert reasons[two_polyps.qa_id] == reasons[colour.qa_id] == reasons[text_yes.qa_id] == \
        "explanation_contradicts_labels"
    assert reasons[no_colour.qa_id] == "unsupported_value"
    assert all(json.loads(r)["explanation"] == planted[k] for k, r in zip(rejected.key, rejected.raw))
    # The same rows with the template's own texts pass: the check rejects the plant, not the row.
    table, rejected = explain_rows(keep, plans, facts, PlantedExplainer(good), GroundingChecker(catalog), phrasings)
    assert len(table) == 4 and len(rejected) == 0
    # Too short or too long is rejected too (two to four sentences).
    short = {k: v.split(". ")[0] + "." for k, v in good.items()}
    _, rejected = explain_rows(keep, plans, facts, PlantedExplainer(short), GroundingChecker(catalog), phrasings)
    assert set(rejected.reason) == {"explanation_length"}


@pytest.fixture(scope="module")
def real_facts(catalog):
    if not (HK / "bounding-boxes.json").is_file() or not (SEG / "masks").is_dir():
        pytest.skip(f"real HyperKvasir boxes / Kvasir-SEG masks not found under {SHARED} (../shared/data is absent)")
    from kvqa.config import BoxesSource, HyperKvasirSource
    from sources import parse_boxes_source, parse_hyperkvasir

    hk = parse_hyperkvasir(HyperKvasirSource(labels_csv=HK / "image-labels.csv", folders_json=HK / "folders.json",
                                             boxes_json=HK / "bounding-boxes.json", image_dir=SEG / "images"),
                           catalog).facts
    boxed = sorted(json.loads((HK / "bounding-boxes.json").read_text()))[:120]
    seg_src = BoxesSource(name="kvasir-seg", masks_dir=SEG / "masks", box_labels=("polyp",), image_label="polyp",
                          image_dir=SEG / "images")
    seg = parse_boxes_source(seg_src, catalog).facts
    return pd.concat([hk[hk.img_id.isin(boxed)], seg], ignore_index=True), seg_src


def test_real_hyperkvasir_boxes_and_kvasir_seg_masks_are_explained_and_shown_as_labelled(real_facts, catalog,
                                                                                           phrasings):
    from generate import TemplateRealizer, compose_plans, realize_plans
    from kvqa.config import PlanConfig

    facts, seg_src = real_facts
    plans = compose_plans(facts, PlanConfig(), 42)
    checker = GroundingChecker(catalog)
    qa, _ = realize_plans(plans, facts, TemplateRealizer(catalog, 42), checker)
    masks = mask_index({"kvasir-seg": seg_src.masks_dir})
    table, rejected = explain_rows(qa, plans, facts, TemplateExplainer(catalog, phrasings, 42), checker, phrasings,
                                   masks)
    assert len(rejected) == 0 and len(table) == len(qa) > 1000
    json_boxes = {k: _box_list(v["bbox"]) for k, v in json.loads((HK / "bounding-boxes.json").read_text()).items()}
    seg_boxes = {r.img_id: _box_list(r.boxes) for r in facts[facts.source == "kvasir-seg"].itertuples()
                 if r.question_class == "polyp_count"}
    box_classes = {"polyp_count", "abnormality_location", "polyp_relative_size"}
    shown = {"hyper-kvasir": 0, "kvasir-seg": 0}
    for row in table.itertuples(index=False):
        cites_boxes = bool(box_classes & set(row.cited_classes))
        boxes = _visual_boxes(row.visual_explanation)
        if not cites_boxes:
            assert boxes == [] and row.segmentation_mask == ""  # never an invented region
            continue
        shown[row.source] += 1
        if row.source == "hyper-kvasir":
            assert boxes == json_boxes[row.img_id]  # the file's boxes, to the pixel and in its order
            assert row.segmentation_mask == ""
        else:
            assert boxes == seg_boxes[row.img_id]
            assert row.segmentation_mask == str(SEG / "masks" / f"{row.img_id}.jpg")
            assert "polyp" in row.explanation
    assert shown["hyper-kvasir"] > 500 and shown["kvasir-seg"] > 20


def _export(sample_run: Path, tmp_path: Path) -> Path:
    """The export on a copy of the sample run (the session's run folder stays as built)."""
    run = tmp_path / "runs" / "sample"
    shutil.copytree(sample_run / "release", run / "release")
    (run / "stages").mkdir(parents=True)
    shutil.copy(sample_run / "stages" / "facts.parquet", run / "stages" / "facts.parquet")
    from flows.cli import app

    result = CliRunner().invoke(app, ["export", "medico-task2", "--run", str(run)])
    assert result.exit_code == 0, result.output
    return run / "export" / "medico-task2"


def test_validation_subset_is_the_task_pages_snippet_on_our_release(sample_run, tmp_path):
    from datasets import Image as HfImage
    from datasets import load_dataset, load_from_disk

    out = _export(sample_run, tmp_path)
    # The task page's snippet, verbatim but for the folder and the size (the sample's test split is small).
    ds = load_dataset(str(sample_run / "release"), cache_dir=str(tmp_path / "hf"))["test"]
    n = min(1500, sum(c == 1 for c in ds["complexity"]))
    val_set_task2 = (
        ds.filter(lambda x: x["complexity"] == 1)
        .shuffle(seed=42)
        .select(range(n))
        .add_column("val_id", list(range(n)))
        .remove_columns(["complexity", "answer", "original", "question_class"])
        .cast_column("image", HfImage())
    )
    ours = load_from_disk(str(out / "val_set_task2"))
    assert ours.column_names == ["val_id", "img_id", "image", "question"] and len(ours) == n > 20
    for column in ("val_id", "img_id", "question"):
        assert ours[column] == val_set_task2[column]
    raw = HfImage(decode=False)
    assert [i["bytes"] for i in ours.cast_column("image", raw)["image"]] == \
        [i["bytes"] for i in val_set_task2.cast_column("image", raw)["image"]]
    # The reference submission answers each val row from the release: same image, question and answer.
    lines = [json.loads(x) for x in (out / "submission_task2.jsonl").read_text().splitlines()]
    answers = dict(zip(ds["qa_id"], ds["answer"]))
    picked = ds.filter(lambda x: x["complexity"] == 1).shuffle(seed=42).select(range(n))
    assert [line["val_id"] for line in lines] == list(range(n))
    assert [line["answer"] for line in lines] == [answers[q] for q in picked["qa_id"]]
    assert all(line["confidence_score"] == 1.0 and line["textual_explanation"] for line in lines)


def test_validator_accepts_the_reference_and_reports_each_planted_fault_on_its_line(sample_run, tmp_path):
    from flows.cli import app

    out = _export(sample_run, tmp_path)
    runner = CliRunner()
    ok = runner.invoke(app, ["validate-task2", str(out / "submission_task2.jsonl")])
    assert ok.exit_code == 0 and "valid against the" in ok.output, ok.output
    lines = [json.loads(x) for x in (out / "submission_task2.jsonl").read_text().splitlines()]
    (out / "visuals" / "0_heatmap.png").write_bytes(b"\x89PNG")
    faults = {  # line number (1-based) -> (edit, what the report must say)
        2: (lambda d: d.update(confidence_score=1.5), "confidence_score 1.5 is outside [0, 1]"),
        3: (lambda d: d.update(val_id=0), "val_id 0 is repeated (first on line 1)"),
        4: (lambda d: d.update(img_id="not-the-image"), "img_id 'not-the-image' does not match"),
        5: (lambda d: d.update(question="Is this a different question?"), "question does not match"),
        6: (lambda d: d.pop("textual_explanation"), "missing field textual_explanation"),
        7: (lambda d: d.update(visual_explanation=[{"type": "heatmap", "data": "/etc/passwd"}]),
            "is not relative to the submission's folder"),
        8: (lambda d: d.update(visual_explanation=[{"type": "heatmap", "data": "visuals/nope.png"}]),
            "does not exist beside the submission"),
        9: (lambda d: d.update(visual_explanation=[{"type": "bounding_box", "data": [[50, 10, 20, 40]]}]),
            "x1 > x2"),
        10: (lambda d: d.update(confidence_score="high"), "confidence_score must be a number"),
        11: (lambda d: d.update(val_id="11"), "val_id must be an integer"),
        12: (lambda d: d.update(answer=""), "answer is empty"),
    }
    for number, (edit, _) in faults.items():
        edit(lines[number - 1])
    text = [json.dumps(d) for d in lines]
    text[12] = "{not json"  # line 13
    text[13] = json.dumps({**lines[13], "visual_explanation": [{"type": "heatmap", "data": "visuals/0_heatmap.png"}]})
    bad = out / "bad.jsonl"
    bad.write_text("\n".join(text) + "\n")
    result = runner.invoke(app, ["validate-task2", str(bad), "--val-set", str(out / "val_set_task2")])
    assert result.exit_code == 1
    reported = [x for x in result.stdout.splitlines() if x.startswith(f"{bad}:")]
    for number, (_, what) in faults.items():
        assert any(x.startswith(f"{bad}:{number}: ") and what in x for x in reported), (number, reported)
    assert any(x.startswith(f"{bad}:13: not JSON") for x in reported)
    assert not any(x.startswith(f"{bad}:14:") for x in reported)  # a relative path that exists is fine
    # val_ids 2 (line 3 now says 0), 10 (line 11 is a string), 12 (line 13 is not JSON) have no line
    assert any(x == f"{bad}: 3 val_id(s) of the validation set have no line: 2, 10, 12" for x in reported), reported
    # Nothing else: only the planted lines are reported (line 3, now claiming val_id 0, may also mismatch
    # val 0's img_id/question, which is right).
    numbers = {x[len(str(bad)) + 1:].split(":", 1)[0] for x in reported}
    assert numbers == {*map(str, faults), "13", " 3 val_id(s) of the validation set have no line"}, numbers
    assert all(x.startswith(f"{bad}:3: val_id 0 is repeated") or "does not match" in x
               for x in reported if x.startswith(f"{bad}:3: "))
    # Unreadable input: one line, exit 2.
    missing = runner.invoke(app, ["validate-task2", str(out / "nope.jsonl")])
    assert missing.exit_code == 2 and "submission not found" in missing.output
    (out / "latin1.jsonl").write_bytes(b'{"val_id": 0}\n{"answer": "caf\xe9"}\n')
    latin = runner.invoke(app, ["validate-task2", str(out / "latin1.jsonl")])
    assert latin.exit_code == 2 and "latin1.jsonl:2: submission is not UTF-8" in latin.output
    no_set = runner.invoke(app, ["validate-task2", str(bad), "--val-set", str(tmp_path)])
    assert no_set.exit_code == 2 and "not a saved validation subset" in no_set.output


def test_llm_explainer_shares_the_cache_repairs_and_quarantine(sample_run, catalog, phrasings, tmp_path, monkeypatch):
    """The `openai` explainer against the loopback stand-in: grounded replies kept, a contradicting one and a
    refusal quarantined with their reasons, a malformed one repaired once; the re-run sends nothing."""
    from explain import make_explainer
    from kvqa.config import LLMConfig
    from openai_standin import OpenAIStandIn

    qa, plans, facts = _stages(sample_run, "qa_dedup", "plans", "facts")
    rows = qa[qa.source == "kvasir-vqa"].head(40)  # the stand-in parses Kvasir-VQA answers back
    faults = {rows.iloc[0].question + "\nAnswer: " + rows.iloc[0].answer: "contradict",
              rows.iloc[1].question + "\nAnswer: " + rows.iloc[1].answer: "refusal",
              rows.iloc[2].question + "\nAnswer: " + rows.iloc[2].answer: "invalid_json"}

    def chooser(messages, attempt):
        head = messages[1]["content"].split("\n\n", 1)[0].removeprefix("Question: ")
        fault = faults.get(head)
        return None if fault == "invalid_json" and len(messages) > 2 else fault  # the repair turn is answered

    monkeypatch.setenv("KVQA_TEST_KEY", "sk-test")
    checker = GroundingChecker(catalog)
    with OpenAIStandIn(chooser=chooser) as standin:
        llm = LLMConfig(base_url=standin.url, cache_dir=tmp_path / "cache", concurrency=4, timeout_s=5,
                        max_retries=1, backoff_base_s=0.01, api_key_env="KVQA_TEST_KEY")
        backend = make_explainer("openai", llm, catalog, phrasings, 42)
        table, rejected = explain_rows(rows, plans, facts, backend, checker, phrasings)
        sent = standin.requests
        again, rejected_again = explain_rows(rows, plans, facts, make_explainer("openai", llm, catalog, phrasings, 42),
                                             checker, phrasings)
        assert standin.requests == sent  # every reply came from the request cache
    assert len(table) + len(rejected) == len(rows) and table.equals(again) and rejected.equals(rejected_again)
    reasons = dict(zip(rejected.key, rejected.reason))
    assert reasons == {rows.iloc[0].qa_id: "explanation_contradicts_labels", rows.iloc[1].qa_id: "refusal"}, \
        rejected[["key", "reason", "detail", "raw"]].to_string()
    assert rows.iloc[2].qa_id in set(table.qa_id) and backend.usage["explain"]["last_execution"]["repairs"] == 1
    assert set(table.explainer) == {"openai:Qwen/Qwen3-8B"} and all(h for h in table.explanation_prompt_hash)
    assert table.explainer_version.str.startswith("explain-v1+").all()
    items = {i.qa_id: i for i in explain_items(rows, plans, facts, phrasings, {})}
    assert all(check_explanation(checker, r.explanation, items[r.qa_id]) is None for r in table.itertuples())


def test_kvasir_seg_masks_go_into_the_release_and_the_submissions_visuals(real_facts, catalog, phrasings, tmp_path):
    """The real Kvasir-SEG frames: their masks are embedded in the `explanations` config and written to
    `visuals/` by the reference submission, which the validator accepts (paths relative, files present)."""
    from explain.medico import reference_lines, submission_problems
    from generate import TemplateRealizer, compose_plans, realize_plans
    from kvqa.config import PlanConfig, PublishConfig
    from publish.release import write_explanation_release

    facts, seg_src = real_facts
    facts = facts[facts.source == "kvasir-seg"].reset_index(drop=True)
    plans = compose_plans(facts, PlanConfig(), 42)
    checker = GroundingChecker(catalog)
    qa, _ = realize_plans(plans, facts, TemplateRealizer(catalog, 42), checker)
    table, _ = explain_rows(qa, plans, facts, TemplateExplainer(catalog, phrasings, 42), checker, phrasings,
                            mask_index({"kvasir-seg": seg_src.masks_dir}))
    frames = sorted((SEG / "images").glob("*.jpg"))
    images = pd.DataFrame({"source": "kvasir-seg", "img_id": [p.stem for p in frames], "path": list(map(str, frames)),
                           "n_bytes": [p.stat().st_size for p in frames]})
    splits = images[["source", "img_id"]].assign(split="test")
    files = write_explanation_release(qa, splits, images, table, tmp_path / "release", PublishConfig())
    assert sum(f["rows"] for f in files["test"]) == len(qa)
    masked = table[table.segmentation_mask != ""]
    out = tmp_path / "submission"
    lines = reference_lines(tmp_path / "release", list(masked.qa_id), out)
    for line, mask in zip(lines, masked.segmentation_mask):
        shown = [v for v in line["visual_explanation"] if v["type"] == "segmentation_mask"]
        assert len(shown) == 1 and (out / shown[0]["data"]).read_bytes() == Path(mask).read_bytes()
    (out / "submission_task2.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert submission_problems(out / "submission_task2.jsonl", None) == []


def test_bad_explanation_phrasings_are_one_line_errors_before_the_run(tmp_path):
    """An explanation phrasings file naming an unknown class, or not YAML, stops `kvqa build` up front (exit 2)."""
    import yaml

    from flows.cli import app
    from kvqa.config import SAMPLE_CONFIG_PATH

    config = yaml.safe_load(SAMPLE_CONFIG_PATH.read_text())
    for src in config["sources"]:
        for key in ("metadata_csv", "image_dir", "labels_csv", "folders_json", "boxes_json"):
            if key in src:
                src[key] = str((SAMPLE_CONFIG_PATH.parent / src[key]).resolve())
    bad = yaml.safe_load(ExplainConfig().phrasings.read_text())
    bad["support"]["polyp_count"].append("polyp_shape")
    for name, text, words in [("unknown.yaml", yaml.safe_dump(bad), "classes not in the catalog: ['polyp_shape']"),
                              ("broken.yaml", "clauses: [", "explanation phrasings")]:
        (tmp_path / name).write_text(text)
        cfg = tmp_path / f"c-{name}"
        cfg.write_text(yaml.safe_dump({**config, "output_root": str(tmp_path / "runs"),
                                       "explain": {"phrasings": str(tmp_path / name)}}))
        # In this process: without KVQA_NO_SUPERVISOR `build` forks it (flows/supervise.py), and the rest
        # of the suite went on in the child, which could hang at exit.
        result = CliRunner().invoke(app, ["build", "--config", str(cfg)], env={"KVQA_NO_SUPERVISOR": "1"})
        assert result.exit_code == 2 and words in result.output and "Traceback" not in result.output, result.output
        assert not (tmp_path / "runs").exists()
