"""HyperKvasir labeled images (`image-labels.csv`) and segmented-image boxes -> atomic facts.

`image-labels.csv` has one row per image: `Video file,Organ,Finding,Classification` ("Video file" is the
image id). Which facts a row gives is data: every catalog class with a `label` feed maps a field's value
(Organ `Lower GI` -> procedure `colonoscopy`, Finding `ulcerative-colitis-grade-2` -> UC grade `grade 2`,
...). A row states only what its one label says: a cecum image gets landmark facts but no "no abnormality"
fact, because HyperKvasir labels one finding per image, not the absence of the others.

With `folders_json` (the download's 23 folders), a row whose (organ, classification, finding) is not one of
the folders is quarantined as `inconsistent_labels`. With `boxes_json` (the segmented images' polyp boxes,
keyed by the same ids), each boxed image also gets the box facts of `sources/boxes.py`.

Units read = label rows + boxes; each is in a fact or in the quarantine (`malformed_row`, `bad_id`,
`duplicate_image`, `inconsistent_labels`, `no_class_for_label`, `unlabelled_image`, and the box reasons).
A label, folders or boxes file that cannot be read at all is a LabelFileError.
"""

from __future__ import annotations

from pathlib import Path

from kvqa.catalog import Catalog, LabelFeed
from kvqa.config import HyperKvasirSource
from kvqa.tables import stable_hash
from sources.boxes import box_facts, read_boxes_json
from sources.common import CsvRows, LabelFileError, ParsedSource, Quarantine, bad_id, csv_rows, order_facts, read_json

REQUIRED_HEADER = ("Video file", "Organ", "Finding", "Classification")
ORGAN_FOLDERS = {"lower-gi-tract": "Lower GI", "upper-gi-tract": "Upper GI"}


def allowed_labels(folders_json: Path) -> set[tuple[str, str, str]]:
    """(organ, classification, folder) of every folder of the download, e.g.
    `labeled-images/lower-gi-tract/pathological-findings/polyp` -> ("Lower GI", "pathological-findings", "polyp")."""
    what = "HyperKvasir folders.json (a list of the download's folders)"
    folders = read_json(folders_json, what)
    if not isinstance(folders, list) or not folders:
        raise LabelFileError(folders_json, None, f"expected a non-empty list of folder names, got "
                                                 f"{type(folders).__name__} {str(folders)[:80]!r}; not a {what}")
    allowed = set()
    for folder in folders:
        parts = folder.strip("/").split("/") if isinstance(folder, str) else []
        if len(parts) != 4 or parts[1] not in ORGAN_FOLDERS:
            raise LabelFileError(folders_json, None, f"unexpected folder {str(folder)[:200]!r} "
                                                     "(labeled-images/<tract>/<class>/<finding>)")
        allowed.add((ORGAN_FOLDERS[parts[1]], parts[2], parts[3]))
    return allowed


def _in_folders(organ: str, classification: str, finding: str, allowed: set[tuple[str, str, str]]) -> bool:
    # The download names the polyp folder `polyp` while the CSV says `polyps`.
    return any((organ, classification, f) in allowed for f in (finding, finding.removesuffix("s")))


def label_feeds(catalog: Catalog, path: Path, table: CsvRows) -> list[tuple[str, LabelFeed]]:
    """The catalog's label feeds; each must read fields the label file has."""
    feeds = [(qc.name, f) for qc in catalog.classes.values() for f in qc.feeds if isinstance(f, LabelFeed)]
    unknown = sorted(({f.field for _, f in feeds} | {k for _, f in feeds for k in f.when}) - set(table.header))
    if unknown:
        raise LabelFileError(path, table.header_line, f"catalog feeds read fields {unknown} that the label file "
                                                      f"lacks (header {table.header})")
    return feeds


def row_values(feed: LabelFeed, row: dict[str, str]) -> str | None:
    if any(row[k] not in allowed for k, allowed in feed.when.items()):
        return None
    return feed.map.get(row[feed.field], feed.default)


def parse_hyperkvasir(src: HyperKvasirSource, catalog: Catalog) -> ParsedSource:
    """Parse the labels (and boxes) into facts; every row and box becomes part of a fact or a quarantine record."""
    path = Path(src.labels_csv)
    quarantine = Quarantine(src.name)
    reject = quarantine.reject
    allowed = allowed_labels(Path(src.folders_json)) if src.folders_json else None
    facts: list[dict] = []
    labelled: dict[str, str] = {}  # img_id -> finding (the image's category)
    table = csv_rows(path, REQUIRED_HEADER, "HyperKvasir image-labels CSV", quarantine)
    rows_read = table.lines_read
    feeds = label_feeds(catalog, path, table)
    for line, raw in table.rows:
        key = f"line {line}"
        row = {h: v.strip() for h, v in zip(table.header, raw)}
        img_id = row["Video file"]
        if why := bad_id(img_id):
            reject(key, "bad_id", why, row)
        elif not all(row[c] for c in REQUIRED_HEADER):
            reject(key, "malformed_row", f"empty field in {[c for c in REQUIRED_HEADER if not row[c]]}", row)
        elif img_id in labelled:
            reject(key, "duplicate_image", f"{img_id} is labelled on an earlier row", row)
        elif allowed is not None and not _in_folders(row["Organ"], row["Classification"], row["Finding"], allowed):
            reject(key, "inconsistent_labels", f"{row['Organ']}/{row['Classification']}/{row['Finding']} is "
                                               "not a folder of the HyperKvasir download", row)
        else:
            row_facts = []
            for cls, feed in feeds:
                value = row_values(feed, row)
                if value is None or any(f["question_class"] == cls for f in row_facts):
                    continue
                qc = catalog.classes[cls]
                row_facts.append({
                    "fact_id": stable_hash(src.name, img_id, cls)[:16], "source": src.name, "img_id": img_id,
                    "source_label": row["Finding"], "question_class": cls, "answer_type": str(qc.answer_type),
                    "values": [value], "source_question": qc.atomic_question, "source_answer": qc.display(value),
                    "source_file": path.name, "source_rows": [line], "boxes": [], "box_label": ""})
            if not row_facts:
                reject(key, "no_class_for_label", f"no catalog class takes {row['Organ']}/{row['Finding']}", row)
                continue
            labelled[img_id] = row["Finding"]
            facts += row_facts
    if src.boxes_json:
        boxes_path = Path(src.boxes_json)
        images, units = read_boxes_json(boxes_path, src.box_labels, reject)
        rows_read += units
        stated = {(f["img_id"], f["question_class"]) for f in facts}
        for image in images:
            keys = image.units or [image.entry_unit]
            if image.img_id not in labelled:
                for u in keys:
                    reject(f"{boxes_path.name}:{image.img_id}#{u}", "unlabelled_image",
                           f"{image.img_id} has boxes but no accepted label row", image.img_id)
                continue
            new = [f for f in box_facts(catalog, src.name, labelled[image.img_id], image, src.box_labels,
                                        boxes_path.name) if (f["img_id"], f["question_class"]) not in stated]
            if not new:
                for u in keys:
                    reject(f"{boxes_path.name}:{image.img_id}#{u}", "no_class_for_label",
                           f"no catalog class is fed by boxes labelled {list(src.box_labels)}", image.img_id)
            facts += new
    return ParsedSource(order_facts(facts, catalog), quarantine.frame(), rows_read=rows_read)
