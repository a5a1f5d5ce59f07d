"""The dataset card (`README.md`), computed from the written shards rather than from intermediate tables.

Reading the counts back from the parquet files is what makes the card trustworthy: whatever the card says
is what `load_dataset` will see. The YAML header declares the `configs:` that `datasets` needs to find
the splits in a local folder or a Hub repo.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import yaml

CARD_COLUMNS = ["img_id", "complexity", "question_class", "source", "answer"]
CITATION = """@article{Gautam2025Jun,
  author = {Gautam, Sushant and Riegler, Michael A. and Halvorsen, P{\\aa}l},
  title = {{Kvasir-VQA-x1: A Multimodal Dataset for Medical Reasoning and Robust MedVQA in Gastrointestinal Endoscopy}},
  journal = {arXiv},
  year = {2025},
  eprint = {2506.09958},
  doi = {10.48550/arXiv.2506.09958}
}"""


def read_release_counts(release_dir: Path, files: dict[str, list[dict]]) -> dict[str, pd.DataFrame]:
    """The card-relevant columns of every split, read back from the shards."""
    return {split: pd.concat([pq.read_table(release_dir / f["file"], columns=CARD_COLUMNS).to_pandas()
                              for f in shard_list], ignore_index=True)
            for split, shard_list in files.items()}


def _size_category(n: int) -> str:
    for bound, name in [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                        (1_000_000, "100K<n<1M")]:
        if n < bound:
            return name
    return "1M<n<10M"


def _cell(value: object) -> str:
    """A markdown table cell: `|` escaped and line breaks joined, so a question that holds them (LLM text)
    stays in its cell instead of breaking the table."""
    return " ".join(str(value).replace("\\", "\\\\").replace("|", "\\|").split())


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(map(_cell, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(_cell, r)) + " |" for r in rows]
    return "\n".join(lines)


def _dedup_section(d: dict) -> list[str]:
    """Dedup figures, the groups of near-identical phrasings, the nearest-neighbour histogram, and the
    image-level near-duplicate figures (clusters kept in one split, pairs across splits)."""
    if not d or d.get("enabled") is False:
        return ["## Deduplication", "", "Not run for this release.", "", *_near_duplicate_images(d or {})]
    g = d.get("global", {})
    t = g.get("near_identical_threshold", "-")
    lines = ["## Deduplication", "",
             f"Questions embedded with `{d['model']}`. Within one image and set of question classes, the plan's "
             "own row is kept and each LLM paraphrase of it is kept only in a band: a paraphrase whose normalised "
             f"question equals a kept row's, or whose cosine similarity to one is >= "
             f"{d.get('paraphrase_max_similarity', '-')}, adds nothing (a duplicate); one whose cosine similarity "
             f"to its source question is < {d['threshold']} no longer asks the same thing (drifted). Every "
             "removal is listed with its rule and similarity in the run's `duplicates` table.", "",
             _table(["figure", "value"], [
                 ["rows before", d["rows_in"]], ["rows kept", d["rows_kept"]], ["rows removed", d["rows_removed"]],
                 *[[f"removed ({k})", v] for k, v in d.get("removed_by", {}).items()],
                 ["paraphrase rows before / kept", f"{d.get('paraphrases_in', '-')} / {d.get('paraphrases_kept', '-')}"],
                 ["distinct phrasings (normalised questions) of the rows kept by the image scope",
                  g.get("distinct_phrasings", "-")],
                 ["rows whose phrasing is shared with another row", g.get("rows_with_recurring_phrasing", "-")],
                 [f"pairs of distinct phrasings with cosine >= {t}", g.get("near_identical_pairs", "-")],
                 [f"phrasings with another within cosine >= {t}",
                  g.get("phrasings_with_a_near_identical_neighbour", "-")],
                 [f"groups of near-identical phrasings (each member within cosine >= {t} of its group's leader)",
                  g.get("near_identical_groups", "-")],
                 [f"test rows repeating a train row's meaning on a train image within "
                  f"{d.get('leakage_distance', '-')} bits of theirs", d.get("test_rows_leaking", "-")]]), ""]
    if g.get("most_repeated"):
        lines += ["Most repeated phrasings:", "", _table(["phrasing", "rows"], g["most_repeated"]), ""]
    if g.get("largest_near_identical_groups"):
        lines += ["Largest groups of near-identical phrasings, by rows (leader: the group's most repeated "
                  "phrasing):", "",
                  _table(["leader", "phrasings", "rows", "least similar member"],
                         [[x["leader"], x["phrasings"], x["rows"], x["min_similarity_to_leader"]]
                          for x in g["largest_near_identical_groups"]]), ""]
    hist = g.get("nearest_neighbour_histogram")
    if hist:
        lines += ["Nearest-neighbour cosine similarity of each distinct phrasing:", "",
                  _table(["similarity", "phrasings"], [[k, v] for k, v in hist.items() if v]), ""]
    return lines + _near_duplicate_images(d)


def _near_duplicate_images(d: dict) -> list[str]:
    """Image-level figures (`dedup.frames.cluster_figures`), when the run computed them."""
    if "clusters" not in d:
        return []
    radius = d.get("near_duplicate_distance", "-")
    lines = ["### Near-duplicate images", "",
             "Frames of one scene (video neighbours; re-encoded, resized, cropped or slightly rotated copies; "
             f"one picture under two ids) are found by a 256-bit perceptual fingerprint (distance <= {radius} "
             "bits, or equal bytes) and every cluster of them is kept in one split.", "",
             _table(["figure", "value"], [
                 ["clusters of near-duplicate images (more than one image)", d["clusters"]],
                 ["images in those clusters", d.get("images_in_clusters", "-")],
                 ["largest cluster (images)", d.get("largest_cluster", "-")],
                 ["test images, each with its nearest train image measured", d.get("test_images_paired", "-")],
                 ["distance of the closest test / train pair (bits)", d.get("closest_cross_split_distance", "-")],
                 [f"test images with a train image within {d.get('leakage_distance', '-')} bits (similar scenes "
                  "kept apart)", d.get("test_images_near_train", "-")]]), ""]
    hist = d.get("nearest_train_distance_histogram") or {}
    if hist:
        lines += ["Distance from each test image to its nearest train image (bits of 256; the split guarantees "
                  f"more than {radius}):", "", _table(["distance", "test images"], list(hist.items())), ""]
    sizes = d.get("cluster_sizes") or {}
    if sizes:
        lines += [_table(["cluster size", "clusters"], [[k, v] for k, v in sizes.items()]), ""]
    return lines


def _review_section(rates: list[dict] | None) -> list[str]:
    """The expert review's sampled error rate per class (`review.error_rates`), when verdicts were recorded."""
    if not rates:
        return []
    return ["## Expert review", "",
            "A sample stratified by question class and complexity was judged by a reviewer (`kvqa review`). Error "
            "rate = rows judged wrong / rows judged ok or wrong (unclear not counted), with its 95 % Wilson score "
            "interval. Rows judged wrong are not in this release (quarantined as `review/expert_rejected`).", "",
            _table(["question_class", "reviewed", "ok", "wrong", "unclear", "error rate", "95 % interval"],
                   [[r["question_class"], r["reviewed"], r["ok"], r["wrong"], r["unclear"],
                     "-" if r["error_rate"] is None else f"{100 * r['error_rate']:.1f} %",
                     f"{100 * r['ci_low']:.1f} - {100 * r['ci_high']:.1f} %"] for r in rates]), "",
            f"Void verdicts (their row's question, answer or image changed after the review, so they count "
            f"nowhere above and the rows are offered for review again): {rates[0]['void']}.", ""]


def augmented_counts(release_dir: Path, files: dict[str, list[dict]]) -> dict:
    """Rows, images and rows per artifact of the `augmented` config, read back from its shards."""
    out = {}
    for split, shard_list in files.items():
        df = pd.concat([pq.read_table(Path(release_dir) / f["file"], columns=["source", "img_id", "artifact"])
                        .to_pandas() for f in shard_list], ignore_index=True)
        out[split] = {"rows": len(df), "images": int(df[["source", "img_id"]].drop_duplicates().shape[0]),
                      "artifact": dict(sorted(Counter(df["artifact"]).items()))}
    return out


def _augmented_truth(truth: dict) -> list[str]:
    """How the answers stay true on moved frames (augment/frames.py), with the release stage's figures."""
    left_out = truth.get("augmented_left_out") or {}
    lines = ["Answers stay true on every variant. The geometric base moves the frame, so an answer about where "
             "things are, how much of the frame they fill, how many are in it or what lies at its edges can "
             "change: such answers derived from boxes are recomputed from the variant's boxes (moved with its "
             "pixels, in the `boxes` column), and a row is left out of a variant on which one of them differs; "
             "an image whose rows hold such an answer without boxes (label-only locations and counts, text, "
             "the corner box artefact, instruments) gets photometric-only variants (no crop, rotation or shift). "
             f"Images with photometric-only variants: {truth.get('photometric_only_images', 0)}. "
             f"(Row, variant) pairs left out because a box-derived answer changed: {sum(left_out.values())}.", ""]
    if left_out:
        lines += [_table(["class that changed", "pairs"], [[c, n] for c, n in left_out.items()]), ""]
    return lines


def _augmented_section(counts: dict, recipe: list[str], truth: dict) -> list[str]:
    if not counts:
        return ["## Augmented track", "", "Not made for this release.", ""]
    artifacts = sorted({a for s in counts.values() for a in s["artifact"]})
    return ["## Augmented track", "",
            "Config `augmented` (`load_dataset(repo, \"augmented\")`): the same QA pairs, each once per weakly "
            "augmented variant of its image. Every variant is the authors' weak base (" + ", ".join(recipe) +
            ") plus one named imaging artifact, seeded from (seed, image, variant); the run's `augmentations` "
            "table records every applied parameter and re-renders any variant byte for byte.", "",
            _table(["split", "rows", "images"], [[s, v["rows"], v["images"]] for s, v in counts.items()]), "",
            _table(["artifact", *counts], [[a, *[v["artifact"].get(a, 0) for v in counts.values()]]
                                           for a in artifacts]), "", *_augmented_truth(truth)]


def _missing_from_test(missing: dict | None) -> list[str]:
    """The classes and levels the test split has no row of (a model is not evaluated on them)."""
    if not missing or not (missing["question_class"] or missing["complexity"]):
        return []
    return ["With no test row (too few images in their stratum for a test image; not evaluated by this release):",
            "", *[f"- level {lvl}" for lvl in missing["complexity"]],
            *[f"- `{c}`" for c in missing["question_class"]], ""]


def card_counts(data: dict[str, pd.DataFrame]) -> dict:
    """Counts per split, complexity, class and source: the figures the card prints (tests compare them)."""
    out: dict = {"splits": {}}
    for split, df in data.items():
        classes = Counter(c for cl in df["question_class"] for c in cl)
        out["splits"][split] = {
            "rows": len(df), "images": int(df[["source", "img_id"]].drop_duplicates().shape[0]),  # ids repeat across sources
            "complexity": {int(k): int(v) for k, v in sorted(Counter(df["complexity"]).items())},
            "question_class": dict(sorted(classes.items(), key=lambda kv: (-kv[1], kv[0]))),
            "source": dict(sorted(Counter(df["source"]).items())),
            "mean_answer_words": round(float(df["answer"].str.split().str.len().mean()), 2) if len(df) else 0.0,
        }
    if "test" in out["splits"]:  # small strata get no test image (round(0.1 x 4) = 0): say which
        test, present = out["splits"]["test"], out["splits"].values()
        out["missing_from_test"] = {
            "complexity": sorted({lvl for v in present for lvl in v["complexity"]} - set(test["complexity"])),
            "question_class": sorted({c for v in present for c in v["question_class"]} - set(test["question_class"]))}
    return out


def _explanations_section(rows: dict) -> list[str]:
    if not rows:
        return []
    return ["## Explanations (Medico 2026 subtask 2)", "",
            "Config `explanations` (`load_dataset(repo, \"explanations\")`): the rows of the default config that "
            "have an explanation (" + ", ".join(f"{s} {n:,}" for s, n in rows.items()) + " rows), with the same "
            "columns plus `explanation` (two to four sentences stating only facts of that image: the grounding "
            "check applies to it as to answers), `visual_explanation` (the source boxes, never invented) and "
            "`segmentation_mask`. It is a config of its own so that the default config keeps Kvasir-VQA-x1's "
            "columns and rows whatever the explanation backend rejects.", ""]


def render_card(release_dir: Path, files: dict[str, list[dict]], *, pretty_name: str, license: str,
                sources: list[dict], generator: str, config_yaml: str, quarantine: pd.DataFrame,
                dedup: dict | None = None, augmented_files: dict[str, list[dict]] | None = None,
                augment_recipe: tuple[str, ...] = (), augmented_truth: dict | None = None,
                explanation_files: dict[str, list[dict]] | None = None,
                review: list[dict] | None = None) -> tuple[str, dict]:
    """Return (README.md text, the counts it states).

    `config_yaml` is printed under "Configuration used" as given: pass `kvqa.config.public_config_yaml`'s
    rendering, never the config file's text (it may hold credentials and this machine's paths).
    """
    data = read_release_counts(Path(release_dir), files)
    counts = card_counts(data)
    if augmented_files:
        counts["augmented"] = augmented_counts(Path(release_dir), augmented_files)
    total = sum(s["rows"] for s in counts["splits"].values())
    header = {
        "license": license, "pretty_name": pretty_name, "language": ["en"],
        "task_categories": ["visual-question-answering"],
        "tags": ["medical", "endoscopy", "gastrointestinal", "vqa", "kvasir"],
        "size_categories": [_size_category(total)],
        "configs": [{"config_name": "default",
                     "data_files": [{"split": s, "path": f"data/{s}-*"} for s in files]},
                    *([{"config_name": "augmented",
                        "data_files": [{"split": s, "path": f"augmented/{s}-*"} for s in augmented_files]}]
                      if augmented_files else []),
                    *([{"config_name": "explanations",
                        "data_files": [{"split": s, "path": f"explanations/{s}-*"} for s in explanation_files]}]
                      if explanation_files else [])],
    }
    if explanation_files:
        counts["explanations"] = {s: sum(f["rows"] for f in fs) for s, fs in explanation_files.items()}
    splits = counts["splits"]
    levels = sorted({lvl for s in splits.values() for lvl in s["complexity"]})
    classes = sorted({c for s in splits.values() for c in s["question_class"]},
                     key=lambda c: (-sum(s["question_class"].get(c, 0) for s in splits.values()), c))
    q_counts = quarantine.groupby(["stage", "reason"]).size().reset_index(name="n") if len(quarantine) else None
    parts = [
        "---", yaml.safe_dump(header, sort_keys=False).strip(), "---", "",
        f"# {pretty_name}", "",
        "Visual question answering pairs about gastrointestinal endoscopy images, generated from source labels "
        "by the open kvqa pipeline in the format of Kvasir-VQA-x1: each row merges 1-3 "
        "atomic question/answer pairs about one image (`complexity`) into one natural question and one "
        "concise clinical answer, and lists the atomic pairs it was built from in `original`.", "",
        f"Generator: `{generator}`. Every count below was read back from the parquet files of this folder.", "",
        "## Splits", "",
        _table(["split", "rows", "images", "mean answer words"],
               [[s, v["rows"], v["images"], v["mean_answer_words"]] for s, v in splits.items()]), "",
        "Splits are disjoint by image (all rows of an image are in one split), stratified by source and "
        "source category.", "",
        "## Rows per complexity", "",
        _table(["split", *[f"level {lvl}" for lvl in levels]],
               [[s, *[v["complexity"].get(lvl, 0) for lvl in levels]] for s, v in splits.items()]), "",
        "## Rows per question class", "",
        "A row counts once for every class it holds.", "",
        _table(["question_class", *splits], [[c, *[v["question_class"].get(c, 0) for v in splits.values()]]
                                             for c in classes]), "",
        *_missing_from_test(counts.get("missing_from_test")),
        "## Sources and licenses", "",
        _table(["source", "kind", "license", *[f"{s} rows" for s in splits]],
               [[src["name"], src["kind"], src["license"], *[v["source"].get(src["name"], 0)
                                                              for v in splits.values()]] for src in sources]),
        "", f"This release is distributed under {license.upper()}; each source's own license applies to its "
        "images and labels.", "",
        "## Quarantine", "",
        "Inputs the pipeline could not use, by stage and reason (each input is either in the release or here):",
        "",
        _table(["stage", "reason", "count"], q_counts.values.tolist()) if q_counts is not None else "None.", "",
        *_dedup_section(dedup or {}),
        *_augmented_section(counts.get("augmented", {}), list(augment_recipe), augmented_truth or {}),
        *_explanations_section(counts.get("explanations", {})),
        *_review_section(review),
        "## Columns", "",
        _table(["column", "meaning"], [
            ["img_id", "image id in its source"],
            ["complexity", "number of atomic QA pairs merged into the question (1-3)"],
            ["question", "natural clinical question"], ["answer", "concise clinical answer"],
            ["original", "JSON list of the atomic pairs `[{\"q\": ..., \"a\": ...}]`, in the plan's order: the "
                         "order a template question asks them; an LLM-written question (`generator`) may ask them "
                         "in another order"],
            ["question_class", "one class per atomic pair, in the order of `original`"],
            ["image", "the image, bytes embedded"],
            ["qa_id", "stable id of the pair"], ["source", "source dataset name"],
            ["source_label", "image category in its source"],
            ["generator", "realizer backend"], ["generator_version", "template/prompt version and hash"],
            ["prompt_hash", "hash of the rendered prompt (LLM backends)"],
            ["boxes", "`default` config: the boxes behind the row's box facts (label, xmin, ymin, xmax, ymax in "
                      "pixels of the image; a location cell is listed when the box covers >= 1/4 of the cell or "
                      "the cell holds >= 1/4 of the box); `augmented` config: the same boxes on the variant "
                      "(moved with its pixels, clipped, gone when under half of a box stays in the frame); empty "
                      "for rows without box facts"],
            ["variant, artifact", "`augmented` config only: the variant's index and its artifact's name"],
            ["explanation, cited_classes", "`explanations` config only: 2-4 sentences justifying the answer from "
                                           "the image's labelled facts (grounding-checked), and the classes of "
                                           "the facts it states"],
            ["visual_explanation", "`explanations` config only: the source boxes behind the cited facts in Medico "
                                   "subtask 2's shape `{type: bounding_box, data: [[x1, y1, x2, y2]], "
                                   "description}`; empty when the labels have no box"],
            ["segmentation_mask", "`explanations` config only: the Kvasir-SEG mask of the image (rows citing "
                                  "mask-derived facts), else null"],
            ["explainer, explainer_version, explanation_prompt_hash", "`explanations` config only: backend, "
                                                                       "phrasings/prompt version, prompt hash"],
        ]), "",
        "## Configuration used", "", "```yaml", config_yaml.strip(), "```", "",
        "## Citation", "", "```bibtex", CITATION, "```", "",
        "<!-- kvqa-counts", json.dumps(counts, sort_keys=True), "-->", "",
    ]
    return "\n".join(parts), counts
