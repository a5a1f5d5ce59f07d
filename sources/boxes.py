"""Bounding boxes -> facts: count, location on the release's 3x3 grid, relative size, the boxes themselves.

Two box sources: a JSON file in the HyperKvasir / Kvasir-Instrument schema
(`{"<id>": {"height": h, "width": w, "bbox": [{"label", "xmin", "ymin", "xmax", "ymax"}]}}`, HyperKvasir's
segmented polyps and Kvasir-Instrument) and a folder of binary masks (Kvasir-SEG), whose boxes are the
connected components of each mask. The catalog says which classes a box label feeds and how
(`feeds: [{kind: boxes, label: polyp, derive: count}]`); the derivations are the rules below.

Grid rule (`location`). The frame is cut into thirds of its width and height. A cell is listed for a box
when the box covers at least a quarter of the cell, or the cell holds at least a quarter of the box
(intersection >= 0.25 x min(cell area, box area)), so a large polyp lists the cells it fills and a small
instrument tip straddling two cells lists both. The values of a fact are the union over its boxes.

Relative size (`relative_size`). Box area / frame area: `small` < 5 %, `medium` 5-20 %, `large` >= 20 %;
the values are the set over the boxes.

Every image id (a JSON key, a mask file's stem) must pass the shared id rule (`sources.common.bad_id`) before
it is used, or its units are quarantined as `bad_id`: a key `../../x` would otherwise read and write outside
the image and run folders. A key that appears twice in the JSON (where `json` keeps only the last) quarantines
every entry under it as `duplicate_image`; two mask files with one stem (`x.png`, `x.bmp`) are
`ambiguous_image`.

Orientation. Boxes are in the displayed orientation (see `sources/images.py`): a mask is read with its
EXIF orientation applied, like its image; an image with boxes whose file has an EXIF orientation other
than 1 is quarantined at the image stage, since a JSON box file does not say which way it was drawn.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageOps

from kvqa.catalog import RELATIVE_SIZES, BoxFeed, Catalog
from kvqa.config import BoxesSource
from kvqa.tables import stable_hash
from sources.common import JsonObject, LabelFileError, ParsedSource, Quarantine, bad_id, order_facts, read_json

GRID = [["upper-left", "upper-center", "upper-right"],
        ["center-left", "center", "center-right"],
        ["lower-left", "lower-center", "lower-right"]]
GRID_ORDER = [c for row in GRID for c in row]
MIN_OVERLAP = 0.25
SIZE_BOUNDS = (0.05, 0.20)  # small < 5 % of the frame <= medium < 20 % <= large
Reject = Callable[[str, str, str, object], None]  # (unit key, reason, detail, raw)


@dataclass(frozen=True)
class Box:
    label: str
    xmin: int
    ymin: int
    xmax: int
    ymax: int

    def as_dict(self) -> dict:
        return {"label": self.label, "xmin": self.xmin, "ymin": self.ymin, "xmax": self.xmax, "ymax": self.ymax}


@dataclass
class ImageBoxes:
    """One image's boxes with the unit (1-based, file order) each came from; `entry_unit` counts an image
    listed without any box."""

    img_id: str
    width: int
    height: int
    boxes: list[Box] = field(default_factory=list)
    units: list[int] = field(default_factory=list)
    entry_unit: int | None = None


def grid_cells(box: Box, width: int, height: int) -> list[str]:
    """The 3x3 cells a box is in: intersection >= a quarter of the cell or a quarter of the box."""
    box_area = max((box.xmax - box.xmin) * (box.ymax - box.ymin), 1)
    cells = []
    for r in range(3):
        y0, y1 = r * height / 3, (r + 1) * height / 3
        for c in range(3):
            x0, x1 = c * width / 3, (c + 1) * width / 3
            inter = max(0.0, min(x1, box.xmax) - max(x0, box.xmin)) * max(0.0, min(y1, box.ymax) - max(y0, box.ymin))
            if inter > 0 and inter >= MIN_OVERLAP * min((x1 - x0) * (y1 - y0), box_area):
                cells.append(GRID[r][c])
    return cells


def relative_size(box: Box, width: int, height: int) -> str:
    share = (box.xmax - box.xmin) * (box.ymax - box.ymin) / (width * height)
    return "small" if share < SIZE_BOUNDS[0] else "medium" if share < SIZE_BOUNDS[1] else "large"


def derive_values(derive: str, boxes: list[Box], width: int, height: int) -> list[str] | None:
    """A fact's values from the boxes of one label; None when the derivation says nothing (no box to
    locate or size)."""
    if derive == "count":
        return [str(len(boxes))]
    if derive == "presence":
        return ["yes" if boxes else "no"]
    if not boxes:
        return None
    if derive == "location":
        cells = {c for b in boxes for c in grid_cells(b, width, height)}
        return [c for c in GRID_ORDER if c in cells]
    sizes = {relative_size(b, width, height) for b in boxes}
    return [s for s in RELATIVE_SIZES if s in sizes]


def _int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (isinstance(value, float) and not value.is_integer()):  # also NaN and Infinity
        raise ValueError(f"{value!r} is not an integer")
    return int(value)


def read_boxes_json(path: Path, box_labels: tuple[str, ...], reject: Reject) -> tuple[list[ImageBoxes], int]:
    """Entries of a HyperKvasir/Kvasir-Instrument boxes file; a bad entry is quarantined whole (its count
    would be wrong without the bad box), each of its units under `<file>:<id>#<unit>`. Returns (images,
    units read). A file that is not a non-empty JSON object is a LabelFileError."""
    path = Path(path)
    what = "boxes JSON (an object keyed by image id)"
    data = read_json(path, what)
    if not isinstance(data, JsonObject) or not data.pairs:
        got = "an empty object" if isinstance(data, dict) else f"a JSON {type(data).__name__}"
        raise LabelFileError(path, None, f"got {got}; not a {what}")
    entries_per_key = Counter(img_id for img_id, _ in data.pairs)
    images, unit = [], 0
    for img_id, entry in data.pairs:
        raw_boxes = entry.get("bbox") if isinstance(entry, dict) else None
        n_units = len(raw_boxes) if isinstance(raw_boxes, list) and raw_boxes else 1
        units = list(range(unit + 1, unit + n_units + 1))
        unit += n_units
        keys = [f"{path.name}:{img_id}#{u}" for u in units]
        try:
            if why := bad_id(img_id):
                raise _EntryError("bad_id", why)
            if entries_per_key[img_id] > 1:
                raise _EntryError("duplicate_image", f"{img_id} is the key of {entries_per_key[img_id]} entries; "
                                                     "which one holds its boxes is unknown")
            if not isinstance(raw_boxes, list):
                raise _EntryError("malformed_entry", "no `bbox` list")
            width, height = _int(entry.get("width")), _int(entry.get("height"))
            if width <= 0 or height <= 0:
                raise _EntryError("malformed_entry", f"image size {width}x{height}")
            boxes = [_box(b, width, height, box_labels) for b in raw_boxes]
        except _EntryError as err:
            for key in keys:
                reject(key, err.reason, err.detail, entry)
            continue
        except (ValueError, TypeError) as err:
            for key in keys:
                reject(key, "malformed_entry", str(err), entry)
            continue
        images.append(ImageBoxes(img_id, width, height, boxes, units if boxes else [],
                                 None if boxes else units[0]))
    return images, unit


class _EntryError(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _box(raw: object, width: int, height: int, box_labels: tuple[str, ...]) -> Box:
    if not isinstance(raw, dict):
        raise _EntryError("bad_box", f"box {raw!r} is not an object")
    if raw.get("label") not in box_labels:
        raise _EntryError("unknown_box_label", f"label {raw.get('label')!r} is not one of {list(box_labels)}")
    try:
        box = Box(raw["label"], *(_int(raw[k]) for k in ("xmin", "ymin", "xmax", "ymax")))
    except (KeyError, ValueError) as err:
        raise _EntryError("bad_box", f"box {raw}: {err}") from err
    if not (0 <= box.xmin < box.xmax <= width and 0 <= box.ymin < box.ymax <= height):
        raise _EntryError("bad_box", f"box {raw} is empty or outside the {width}x{height} image")
    return box


def mask_boxes(mask: np.ndarray, label: str, min_area: int) -> list[Box]:
    """Boxes of a binary mask's connected components (8-connected, area >= min_area), in the HyperKvasir
    convention: one pixel outside the component on each side (checked against bounding-boxes.json on the
    real Kvasir-SEG frames), clipped to the image."""
    import cv2

    h, w = mask.shape
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    boxes = []
    for x, y, bw, bh, area in sorted(stats[1:].tolist(), key=lambda s: (s[1], s[0])):
        if area >= min_area:
            boxes.append(Box(label, max(x - 1, 0), max(y - 1, 0), min(x + bw, w), min(y + bh, h)))
    return boxes


def mask_files(masks_dir: Path) -> list[Path]:
    """The files of a masks folder, sorted by name; a LabelFileError when it is not a folder with files."""
    masks_dir = Path(masks_dir)
    try:
        files = sorted(p for p in masks_dir.iterdir() if p.is_file())
    except NotADirectoryError:
        raise LabelFileError(masks_dir, None, "is a file, expected a folder of mask images") from None
    except OSError as err:
        raise LabelFileError(masks_dir, None, f"cannot be listed: {err.strerror or err}") from None
    if not files:
        raise LabelFileError(masks_dir, None, "holds no files, expected a folder of mask images")
    return files


def read_mask_boxes(masks_dir: Path, label: str, min_area: int, reject: Reject) -> tuple[list[ImageBoxes], int]:
    """Kvasir-SEG masks (white object on black, JPEG-noisy: thresholded at 128) -> boxes per image, in the
    mask's displayed orientation (its EXIF orientation applied). A mask file is one unit when quarantined
    (`bad_id`, `ambiguous_image`, `unreadable_mask`)."""
    files = mask_files(masks_dir)
    files_per_id = Counter(p.stem for p in files)
    images, unit = [], 0
    for path in files:
        try:
            if why := bad_id(path.stem):
                raise _EntryError("bad_id", f"mask {path.name!r}: {why}")
            if files_per_id[path.stem] > 1:
                same = [p.name for p in files if p.stem == path.stem]
                raise _EntryError("ambiguous_image", f"{files_per_id[path.stem]} mask files for {path.stem}: {same}")
            try:
                with Image.open(path) as im:
                    mask = np.asarray(ImageOps.exif_transpose(im).convert("L")) >= 128
            except (OSError, ValueError, Image.DecompressionBombError) as err:
                raise _EntryError("unreadable_mask", f"{path.name}: {err}") from err
        except _EntryError as err:
            unit += 1
            reject(path.name, err.reason, err.detail, str(path))
            continue
        boxes = mask_boxes(mask, label, min_area)
        units = list(range(unit + 1, unit + max(len(boxes), 1) + 1))
        unit = units[-1]
        images.append(ImageBoxes(path.stem, mask.shape[1], mask.shape[0], boxes, units if boxes else [],
                                 None if boxes else units[0]))
    return images, unit


def box_facts(catalog: Catalog, source: str, source_label: str, image: ImageBoxes, box_labels: tuple[str, ...],
              source_file: str) -> list[dict]:
    """Facts of every catalog class fed by the boxes of a label this source annotates exhaustively."""
    facts = []
    for qc in catalog.classes.values():
        for feed in qc.feeds:
            if not isinstance(feed, BoxFeed) or feed.label not in box_labels:
                continue
            picked = [(b, u) for b, u in zip(image.boxes, image.units) if b.label == feed.label]
            values = derive_values(feed.derive, [b for b, _ in picked], image.width, image.height)
            if values is None:
                continue
            units = [u for _, u in picked] or ([image.entry_unit] if image.entry_unit else list(image.units))
            facts.append({
                "fact_id": stable_hash(source, image.img_id, qc.name)[:16], "source": source,
                "img_id": image.img_id, "source_label": source_label, "question_class": qc.name,
                "answer_type": str(qc.answer_type), "values": values, "source_question": qc.atomic_question,
                "source_answer": "; ".join(qc.display(v) for v in values), "source_file": source_file,
                "source_rows": units, "boxes": [b.as_dict() for b, _ in picked], "box_label": feed.label})
            break  # one feed per class and source
    return facts


def parse_boxes_source(src: BoxesSource, catalog: Catalog):
    """A boxes-only source (Kvasir-Instrument JSON, Kvasir-SEG masks) -> facts; every box is in a fact or
    quarantined."""
    quarantine = Quarantine(src.name)
    reject = quarantine.reject

    if src.boxes_json is not None:
        images, units = read_boxes_json(Path(src.boxes_json), src.box_labels, reject)
        source_file = Path(src.boxes_json).name
    else:
        images, units = read_mask_boxes(Path(src.masks_dir), src.mask_label, src.min_mask_area, reject)
        source_file = Path(src.masks_dir).name
    facts = [f for im in images for f in box_facts(catalog, src.name, src.image_label, im, src.box_labels, source_file)]
    unused = [im for im in images if not any(f["img_id"] == im.img_id for f in facts)]
    for im in unused:  # no catalog class takes these labels: the boxes are read but feed nothing
        for u in im.units or [im.entry_unit]:
            reject(f"{source_file}:{im.img_id}#{u}", "no_class_for_label",
                   f"no catalog class is fed by boxes labelled {list(src.box_labels)}", im.img_id)
    return ParsedSource(order_facts(facts, catalog), quarantine.frame(), rows_read=units)
