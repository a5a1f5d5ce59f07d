"""`report.html`: one static page per run that a person opens offline to see whether the release is right.

Sections: rows per complexity and per class against the Kvasir-VQA-x1 reference (with the relative
difference), question and answer lengths, distinct phrasings per class, the quarantine by stage and reason
with example rows (raw input shown), dedup (nearest-neighbour similarity, removed rows by rule with
examples, leakage figures), the augmented track (contact sheet and the parameter ranges actually drawn),
example rows per class with a thumbnail, and the expert review's sampled error rate per class.

Everything is read from the run folder's tables (`REPORT_INPUTS`) and the release shards, plus the
figures the flow already computed (dedup, leakage). Plots and thumbnails are PNG/JPEG files beside the
page in `report_files/`, linked relatively, so the folder can be copied or zipped and opened anywhere.
"""

from __future__ import annotations

import html
import io
import json
import shutil
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
from PIL import Image, ImageOps

from kvqa.tables import atomic_path, stable_hash, write_text
from kvqa.text import normalise_text
from report import figures
from report.reference import Reference, compare_shares, load_reference

PAGE = "report.html"
FILES_DIR = "report_files"
REPORT_INPUTS = ["stages/qa.parquet", "stages/qa_dedup.parquet", "stages/duplicates.parquet",
                 "stages/images.parquet", "stages/leakage.parquet", "stages/leakage_images.parquet",
                 "stages/augmentations.parquet", "quarantine.parquet"]
EXAMPLES = 3
CLOSEST_PAIRS = 6  # closest test / train image pairs shown with thumbnails
THUMB_WIDTH = 200
# recipe parameters that are settings or bookkeeping, not a drawn value
NOT_DRAWN = {"shape", "interpolation", "fill", "fill_mask", "p", "order", "output_shape", "sha256", "dtype",
             "matrix", "bbox_matrix"}
e = html.escape


def release_table(run_dir: Path) -> pd.DataFrame:
    """Every row of the `default` config (all columns but the image), with its split from the shard name
    and its `explanation` from the `explanations` config where that config has the row ("" where not)."""
    frames = []
    for shard in sorted((Path(run_dir) / "release" / "data").glob("*.parquet")):
        names = [n for n in pq.read_schema(shard).names if n != "image"]
        frames.append(pq.read_table(shard, columns=names).to_pandas().assign(split=shard.name.split("-", 1)[0]))
    if not frames:
        return pd.DataFrame(columns=["qa_id", "img_id", "source", "complexity", "question", "answer",
                                     "question_class", "split", "explanation"])
    rows = pd.concat(frames, ignore_index=True)
    explained = [pq.read_table(s, columns=["qa_id", "explanation"]).to_pandas()
                 for s in sorted((Path(run_dir) / "release" / "explanations").glob("*.parquet"))]
    explanations = dict(zip(*(pd.concat(explained)[c] for c in ("qa_id", "explanation")))) if explained else {}
    return rows.assign(explanation=rows["qa_id"].map(explanations).fillna(""))


class _Files:
    """Writes the page's images into `report_files/` and remembers them (the stage's outputs)."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.written: list[str] = []

    def add(self, name: str, data: bytes) -> str:
        rel = f"{FILES_DIR}/{name}"
        with atomic_path(self.run_dir / rel) as tmp:
            tmp.write_bytes(data)
        self.written.append(rel)
        return rel

    def figure(self, name: str, png: bytes, alt: str) -> str:
        return f'<figure><img src="{e(self.add(name, png))}" alt="{e(alt)}"></figure>'

    def thumbnail(self, source: str, img_id: str, path: str | None) -> str:
        """An `<img>` of the image's thumbnail, written once however many sections show it ("" without a path)."""
        if not path:
            return ""
        rel = f"{FILES_DIR}/thumbs/{source}__{img_id}.jpg"
        if rel not in self.written:
            self.add(f"thumbs/{source}__{img_id}.jpg", _thumbnail(Path(path)))
        return f'<img src="{e(rel)}" alt="image {e(img_id)}">'


def _table(header: list[str], rows: list[list], cls: str = "") -> str:
    head = "".join(f"<th>{e(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c if isinstance(c, _Raw) else e(_fmt(c))}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


class _Raw(str):
    """Cell content that is already HTML."""


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.1f} %"


def _share(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"


def _class_counts(rows: pd.DataFrame) -> dict[str, int]:
    return rows["question_class"].explode().dropna().value_counts().to_dict() if len(rows) else {}


def _distribution_section(rows: pd.DataFrame, ref: Reference, files: _Files) -> str:
    total = len(rows)
    levels = compare_shares({int(k): int(v) for k, v in rows["complexity"].value_counts().items()}, total,
                            ref.complexity, ref.rows)
    classes = compare_shares(_class_counts(rows), total, ref.question_class, ref.rows)

    def table(items, what):
        return _table([what, "rows", "share", f"{ref.name} rows", f"{ref.name} share", "relative difference"],
                      [[i["key"], i["rows"], _share(i["share"]), i["reference_rows"], _share(i["reference_share"]),
                        _pct(i["relative_difference"])] for i in items])

    in_ref = [c for c in classes if c["relative_difference"] is not None]
    out = [f"<p>Reference: {e(ref.name)} ({ref.rows:,} rows; source: {e(ref.source)}). Shares are compared, "
           f"not counts: this release has {total:,} rows. A row counts once for every class it holds, as in the "
           "reference. Relative difference = this release's share / the reference's share - 1.</p>",
           "<h3>Rows per complexity</h3>", table(levels, "complexity"),
           files.figure("complexity.png", figures.share_bars([f"level {i['key']}" for i in levels],
                                                             [i["share"] for i in levels],
                                                             [i["reference_share"] for i in levels],
                                                             "Rows per complexity", ref.name), "rows per complexity"),
           "<h3>Rows per question class</h3>", table(classes, "question_class"),
           files.figure("classes.png", figures.share_bars([str(c["key"]) for c in classes],
                                                          [c["share"] for c in classes],
                                                          [c["reference_share"] for c in classes],
                                                          "Rows per question class", ref.name),
                        "rows per question class")]
    if in_ref:
        out.append(files.figure("classes-relative-difference.png", figures.relative_difference_bars(
            [str(c["key"]) for c in in_ref], [c["relative_difference"] for c in in_ref],
            f"Share of rows per class vs {ref.name}"), "relative difference per class"))
    return "\n".join(out)


def _lengths_section(rows: pd.DataFrame, files: _Files) -> str:
    q = {int(k): g["question"].str.split().str.len().tolist() for k, g in rows.groupby("complexity")}
    a = {int(k): g["answer"].str.split().str.len().tolist() for k, g in rows.groupby("complexity")}
    stats = []
    for level in sorted(q):
        qs, ans = pd.Series(q[level]), pd.Series(a[level])
        stats.append([f"level {level}", len(qs), round(qs.mean(), 1), int(qs.quantile(0.99)), round(ans.mean(), 1),
                      int(ans.quantile(0.99))])
    return "\n".join([
        "<p>Lengths in whitespace-separated words. The reference release's answers: mean about 10 tokens, "
        "99th percentile 28.</p>",
        _table(["complexity", "rows", "question mean", "question p99", "answer mean", "answer p99"], stats),
        files.figure("lengths.png", figures.length_histograms(q, a), "question and answer length histograms")])


def distinct_texts(texts: pd.Series) -> int:
    return int(texts.map(lambda t: normalise_text(t, punctuation=False)).nunique())


def _phrasings_section(rows: pd.DataFrame, files: _Files) -> str:
    exploded = rows[["question_class", "complexity", "question"]].explode("question_class")
    items = []
    for cls, g in exploded.groupby("question_class"):
        single = g[g["complexity"] == 1]
        items.append([str(cls), len(g), distinct_texts(g["question"]), len(single), distinct_texts(single["question"])])
    items.sort(key=lambda r: (-r[4], r[0]))
    out = ["<p>Distinct questions (as dedup compares them: <code>kvqa.text.normalise_text</code>) among the rows holding each class; level 1 = the class asked "
           "alone, so its count is the number of phrasings of that class in use.</p>",
           _table(["question_class", "rows", "distinct questions", "level-1 rows", "distinct level-1 questions"],
                  items)]
    if items:
        out.append(files.figure("phrasings.png", figures.count_bars([r[0] for r in items], [r[4] for r in items],
                                                                    "distinct level-1 questions",
                                                                    "Distinct phrasings per class"),
                                "distinct phrasings per class"))
    return "\n".join(out)


def _quarantine_section(quarantine: pd.DataFrame, files: _Files) -> str:
    if not len(quarantine):
        return "<p>Nothing was quarantined.</p>"
    counts = quarantine.groupby(["stage", "reason"], sort=True).size().reset_index(name="n")
    out = [f"<p>{len(quarantine):,} inputs the pipeline could not use (or a reviewer rejected), by stage and "
           "reason, each with up to three example rows and the raw input it came from.</p>",
           _table(["stage", "reason", "count"], counts.values.tolist()),
           files.figure("quarantine.png", figures.count_bars([f"{s}/{r}" for s, r, _ in counts.values],
                                                             counts["n"].tolist(), "rows",
                                                             "Quarantine by stage and reason", figures.REFERENCE),
                        "quarantine by stage and reason")]
    for (stage, reason), g in quarantine.groupby(["stage", "reason"], sort=True):
        out += [f"<h3>{e(stage)} / {e(reason)} ({len(g):,})</h3>",
                _table(["source", "key", "detail", "raw input"],
                       [[r.source, r.key, r.detail, _Raw(f"<code>{e(r.raw)}</code>")]
                        for r in g.head(EXAMPLES).itertuples(index=False)], "examples")]
    return "\n".join(out)


def _dedup_section(qa: pd.DataFrame, duplicates: pd.DataFrame, leakage: pd.DataFrame, leakage_images: pd.DataFrame,
                   images: pd.DataFrame, dedup: dict, leak: dict, files: _Files) -> str:
    question = dict(zip(qa["qa_id"], qa["question"]))
    out = []
    if dedup.get("enabled") is False:
        out.append("<p>Deduplication was not run for this release.</p>")
    else:
        out.append(_table(["figure", "value"], [
            ["rows before", dedup.get("rows_in")], ["rows kept", dedup.get("rows_kept")],
            ["rows removed", dedup.get("rows_removed")],
            *[[f"removed ({k})", v] for k, v in (dedup.get("removed_by") or {}).items()],
            ["distinct phrasings", (dedup.get("global") or {}).get("distinct_phrasings")]]))
    hist = (dedup.get("global") or {}).get("nearest_neighbour_histogram") or {}
    if hist:
        out += ["<h3>Nearest-neighbour similarity</h3>",
                "<p>For each distinct phrasing, the cosine similarity of its nearest other phrasing.</p>",
                files.figure("nearest-neighbour.png", figures.histogram_bars(
                    list(hist), list(hist.values()), "cosine similarity to the nearest other phrasing",
                    "Nearest-neighbour similarity of distinct phrasings"), "nearest-neighbour similarity histogram")]
    out.append("<h3>Removed rows by rule</h3>")
    if not len(duplicates):
        out.append("<p>No row was removed.</p>")
    else:
        by_rule = duplicates.groupby(["scope", "rule"], sort=True).size().reset_index(name="n")
        out += [_table(["scope", "rule", "rows removed"], by_rule.values.tolist()),
                files.figure("dedup-rules.png", figures.count_bars([f"{s}/{r}" for s, r, _ in by_rule.values],
                                                                   by_rule["n"].tolist(), "rows removed",
                                                                   "Removed rows by rule"), "removed rows by rule")]
        for (scope, rule), g in duplicates.groupby(["scope", "rule"], sort=True):
            out += [f"<h4>{e(scope)} / {e(rule)} ({len(g):,})</h4>",
                    _table(["removed question", "kept question it duplicates", "similarity"],
                           [[question.get(r.qa_id, r.qa_id), question.get(r.duplicate_of, r.duplicate_of or "-"),
                             r.similarity] for r in g.head(EXAMPLES).itertuples(index=False)], "examples")]
    out += ["<h3>Leakage between the splits</h3>",
            "<p>Near duplicates (equal bytes, or fingerprints within "
            f"{e(str(leak.get('near_duplicate_distance', '-')))} bits) are kept in one split. What the split did "
            "not join is measured here: every test image's nearest train images, and test rows that repeat a train "
            f"row's meaning on a train image within {e(str(leak.get('leakage_distance', '-')))} bits of theirs.</p>",
            _table(["figure", "value"], [
                ["test rows repeating a train row's meaning on a nearby train image",
                 leak.get("test_rows_leaking", len(leakage))],
                ["distance of the closest test / train image pair (bits of 256)",
                 leak.get("closest_cross_split_distance", "-")],
                ["test images with a train image within the leakage distance", leak.get("test_images_near_train", "-")],
                ["clusters of near-duplicate images (kept in one split)", leak.get("clusters", "-")],
                ["images in those clusters", leak.get("images_in_clusters", "-")],
                ["largest cluster (images)", leak.get("largest_cluster", "-")]])]
    hist = leak.get("nearest_train_distance_histogram") or {}
    if hist:
        out.append(files.figure("nearest-train-image.png", figures.histogram_bars(
            list(hist), list(hist.values()), "bits (of 256) to the nearest train image",
            "Distance of each test image to its nearest train image"), "nearest train image distance histogram"))
    nearest = leakage_images[leakage_images["rank"] == 1].sort_values(
        ["distance", "test_source", "test_img_id"], kind="stable").head(CLOSEST_PAIRS)
    if len(nearest):
        paths = dict(zip(zip(images["source"], images["img_id"]), images["path"]))
        out += ["<h4>Closest test / train image pairs</h4>", _table(
            ["test image", "nearest train image", "distance (bits)"],
            [[_Raw(files.thumbnail(r.test_source, r.test_img_id, paths.get((r.test_source, r.test_img_id)))
                   + f"<br>{e(r.test_source)} / {e(r.test_img_id)}"),
              _Raw(files.thumbnail(r.train_source, r.train_img_id, paths.get((r.train_source, r.train_img_id)))
                   + f"<br>{e(r.train_source)} / {e(r.train_img_id)}"),
              r.distance] for r in nearest.itertuples(index=False)], "examples")]
    if len(leakage):
        out.append(_table(["test question", "train question", "similarity", "image distance (bits)"],
                          [[question.get(r.test_qa_id, r.test_qa_id), question.get(r.train_qa_id, r.train_qa_id),
                            r.similarity, r.image_distance] for r in leakage.head(EXAMPLES).itertuples(index=False)],
                          "examples"))
    return "\n".join(out)


def _flat_params(params: dict, prefix: str = "") -> dict[str, float]:
    """The drawn scalar values of a recorded step (`augment.render.make_recipe`), by dotted name; an array
    summary (`{"ndarray": shape, ...}`, e.g. a blur kernel) gives its size."""
    out: dict[str, float] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if key in NOT_DRAWN:
            continue
        if isinstance(value, dict):
            if "ndarray" in value:
                out[f"{name} size"] = float(value["ndarray"][0]) if value["ndarray"] else 0.0
            else:
                out.update(_flat_params(value, f"{name}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def drawn_parameter_ranges(augmentations: pd.DataFrame) -> list[dict]:
    """Per recorded step (base steps and each artifact): variants, how many fired, and per drawn parameter
    its min and max over the variants where it fired."""
    steps: dict[str, dict] = {}
    for recipe in augmentations["recipe"]:
        for step in json.loads(recipe)["steps"]:
            s = steps.setdefault(step["name"], {"transform": step["transform"], "variants": 0, "fired": 0,
                                                "params": {}})
            s["variants"] += 1
            if step.get("fired"):
                s["fired"] += 1
                for k, v in _flat_params(step.get("params") or {}).items():
                    lo, hi = s["params"].get(k, (v, v))
                    s["params"][k] = (min(lo, v), max(hi, v))
    return [{"step": name, **{k: v for k, v in s.items() if k != "params"},
             "params": {k: [round(lo, 4), round(hi, 4)] for k, (lo, hi) in sorted(s["params"].items())}}
            for name, s in steps.items()]


def _augmented_section(run_dir: Path, augmentations: pd.DataFrame, contact_sheet: str | None, files: _Files) -> str:
    if not len(augmentations):
        return "<p>No augmented track was made for this release.</p>"
    out = [f"<p>{len(augmentations):,} variants of {augmentations[['source', 'img_id']].drop_duplicates().shape[0]:,} "
           "images. Each is the weak geometric base plus one named artifact.</p>"]
    if contact_sheet is not None:
        out.append(files.figure("contact-sheet.png", (Path(run_dir) / contact_sheet).read_bytes(),
                                "contact sheet of the augmented track"))
    ranges = drawn_parameter_ranges(augmentations)
    out += ["<h3>Parameter ranges actually drawn</h3>",
            "<p>Over every recorded variant (the run's <code>augmentations</code> table): per step, how often it "
            "fired and the smallest and largest value drawn for each parameter.</p>",
            _table(["step", "transform", "variants", "fired", "parameter ranges drawn"],
                   [[r["step"], r["transform"], r["variants"], r["fired"],
                     _Raw("<br>".join(f"{e(k)}: {lo:g} &ndash; {hi:g}" for k, (lo, hi) in r["params"].items())
                          or "-")] for r in ranges])]
    return "\n".join(out)


def _thumbnail(path: Path) -> bytes:
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
        im = im.resize((THUMB_WIDTH, max(1, round(im.height * THUMB_WIDTH / im.width))), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def _examples_section(rows: pd.DataFrame, images: pd.DataFrame, files: _Files) -> str:
    if not len(rows):
        return "<p>The release has no rows.</p>"
    paths = dict(zip(zip(images["source"], images["img_id"]), images["path"]))
    ordered = rows.assign(_o=[stable_hash("report-example", q) for q in rows["qa_id"]]).sort_values("_o")
    exploded = ordered.explode("question_class")
    out = ["<p>For each class, a few release rows (chosen by a hash of their id) with their image.</p>"]
    for cls in sorted(exploded["question_class"].dropna().unique()):
        out.append(f"<h3>{e(str(cls))}</h3>")
        cells = []
        for r in exploded[exploded["question_class"] == cls].head(EXAMPLES).itertuples(index=False):
            img = files.thumbnail(r.source, r.img_id, paths.get((r.source, r.img_id)))
            explanation = getattr(r, "explanation", "") or ""
            cells.append(f'<div class="example">{img}<p><b>Q</b> (level {int(r.complexity)}): {e(r.question)}</p>'
                         f"<p><b>A</b>: {e(r.answer)}</p>"
                         + (f"<p><b>Explanation</b>: {e(str(explanation))}</p>" if explanation else "")
                         + f'<p class="id">{e(r.source)} / {e(r.img_id)} &middot; {e(r.qa_id)} &middot; {e(r.split)}</p>'
                         "</div>")
        out.append('<div class="examples">' + "".join(cells) + "</div>")
    return "\n".join(out)


def _review_section(rates: list[dict], files: _Files) -> str:
    if not rates:
        return ("<p>No expert review recorded for this run. <code>kvqa review export --run RUN --n N --seed S</code> "
                "writes a review sheet; <code>kvqa review import --run RUN FILE</code> brings the verdicts back.</p>")
    judged = [r for r in rates if r["error_rate"] is not None]
    out = ["<p>Sampled error rate = rows judged <i>wrong</i> / rows judged <i>ok</i> or <i>wrong</i> (<i>unclear</i> "
           "not counted), with its 95 % Wilson score interval. Rows judged wrong are quarantined "
           "(<code>review/expert_rejected</code>) and are not in the release.</p>",
           _table(["question_class", "reviewed", "ok", "wrong", "unclear", "error rate", "95 % interval"],
                  [[r["question_class"], r["reviewed"], r["ok"], r["wrong"], r["unclear"],
                    "-" if r["error_rate"] is None else f"{100 * r['error_rate']:.1f} %",
                    f"{100 * r['ci_low']:.1f} - {100 * r['ci_high']:.1f} %"] for r in rates])]
    if judged:
        out.append(files.figure("review.png", figures.error_rate_plot(
            [r["question_class"] for r in judged], [r["error_rate"] for r in judged],
            [r["ci_low"] for r in judged], [r["ci_high"] for r in judged]), "sampled error rate per class"))
    return "\n".join(out)


STYLE = """body{font-family:sans-serif;max-width:1150px;margin:1em auto;color:#222}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}td,th{border:1px solid #ccc;padding:2px 6px;
text-align:left;vertical-align:top}th{background:#f0f0f0}table.examples td{max-width:520px;word-break:break-word}
figure{margin:.6em 0}figure img{max-width:100%}nav a{margin-right:1em}.examples{display:flex;flex-wrap:wrap;gap:1em}
.example{width:340px;border:1px solid #ddd;padding:.5em}.example img{width:200px}.id{color:#666;font-size:.8em}
code{font-size:.85em}"""


def write_quality_report(run_dir: Path, run_name: str, dedup: dict, leakage: dict, review_rates: list[dict],
                         contact_sheet: str | None = None, reference: Reference | None = None) -> tuple[dict, list[str]]:
    """Write `report.html` and `report_files/` in `run_dir`; return (summary, written paths). `contact_sheet`:
    the augment stage's sheet (run-relative), shown when there is one."""
    run_dir = Path(run_dir)
    shutil.rmtree(run_dir / FILES_DIR, ignore_errors=True)
    files = _Files(run_dir)
    ref = reference or load_reference()
    qa, qa_dedup, duplicates, images, leaks, leak_images, augmentations, quarantine = (
        pd.read_parquet(run_dir / f) for f in REPORT_INPUTS)
    rows = release_table(run_dir)
    splits = rows["split"].value_counts().sort_index().to_dict()
    sections = [
        ("distribution", "Rows against the reference", _distribution_section(rows, ref, files) if len(rows) else
         "<p>The release has no rows.</p>"),
        ("lengths", "Question and answer lengths", _lengths_section(rows, files)),
        ("phrasings", "Distinct phrasings per class", _phrasings_section(rows, files)),
        ("quarantine", "Quarantine", _quarantine_section(quarantine, files)),
        ("dedup", "Deduplication and leakage", _dedup_section(qa, duplicates, leaks, leak_images, images, dedup,
                                                             leakage, files)),
        ("augmented", "Augmented track", _augmented_section(run_dir, augmentations, contact_sheet, files)),
        ("examples", "Examples per class", _examples_section(rows, images, files)),
        ("review", "Expert review", _review_section(review_rates, files)),
    ]
    summary_table = _table(["split", "rows", "images"],
                           [[s, n, rows[rows["split"] == s][["source", "img_id"]].drop_duplicates().shape[0]]
                            for s, n in splits.items()])
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>kvqa quality report: '
            f"{e(run_name)}</title><style>{STYLE}</style></head><body>"
            f"<h1>Quality report: run {e(run_name)}</h1>"
            f"<p>{len(rows):,} release rows ({len(qa_dedup):,} after dedup, {len(quarantine):,} inputs quarantined). "
            "Every figure is read from this run folder's tables and release files.</p>" + summary_table +
            "<nav>" + "".join(f'<a href="#{k}">{e(t)}</a>' for k, t, _ in sections) + "</nav>"
            + "".join(f'<section id="{k}"><h2>{e(t)}</h2>\n{body}</section>\n' for k, t, body in sections)
            + "</body></html>\n")
    write_text(page, run_dir / PAGE)
    return ({"page": PAGE, "sections": [k for k, _, _ in sections], "files": len(files.written)},
            [PAGE, *files.written])
