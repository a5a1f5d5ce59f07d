"""Deterministic generator of the embedded sample: synthetic endoscopy-like frames + Kvasir-VQA labels.

The sample is made by the project, never copied from the real datasets. Each frame is drawn from a seeded
generator keyed by (seed, frame index): mucosa texture with vessels and a dark circular field of view,
polyp-like lesions, ulcerative-colitis or oesophagitis patches, an instrument-like tube or forceps on some,
on-screen text and the green/black position box on some, as real frames have. The labels are written in
the real Kvasir-VQA metadata format (`source,question,answer,img_id`) and are computed from what was drawn:
locations are the 3x3 grid cells an object covers, counts are the objects drawn. The real file's quirks are
reproduced on purpose (`; ` and `;` joins in any order, `lower-rigth`, `>20`, the dropped "easy to
detect" question, `none` rows with an empty answer, one row per polyp) so the sample exercises the parser.

A second, smaller part (`hyper-kvasir/`) is laid out like the HyperKvasir download: `image-labels.csv`
(`Video file,Organ,Finding,Classification`), `folders.json`, `bounding-boxes.json` (polyp boxes computed
from the drawn lesions) and the images in `labeled-images/<tract>/<classification>/<finding>/<id>.jpg`, one
or two frames per finding of the 23. Its deliberate faults exercise the quarantine: a short row, a
duplicated id, an organ that contradicts the finding, a labelled image whose file is absent, a box outside
its image and boxes of an image with no label row.

Run `python -m data.make_sample` (or `kvqa make-sample`) to rewrite `data/sample/`.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from kvqa.tables import atomic_path, rng_for, stable_hash

SAMPLE_DIR = Path(__file__).resolve().parent / "sample"
WIDTH, HEIGHT = 400, 320
GRID = [["upper-left", "upper-center", "upper-right"],
        ["center-left", "center", "center-right"],
        ["lower-left", "lower-center", "lower-right"]]
# How many frames of each Kvasir-VQA category the sample holds.
CATEGORIES = [("Polyps", 14), ("Instrument", 10), ("Ulcerative Colitis", 8), ("Esophagitis", 8), ("Normal", 8)]
Q = {
    "procedure": "What type of procedure is the image taken from?",
    "text": "Is there text?",
    "removed": "Have all polyps been removed?",
    "box": "Is there a green/black box artefact?",
    "n_instr": "How many instrumnets are in the image?",
    "n_find": "How many findings are present?",
    "ptype": "What type of polyp is present?",
    "psize": "What is the size of the polyp?",
    "instr_loc": "Where in the image is the instrument?",
    "instr": "Are there any instruments in the image? Check all that are present.",
    "n_polyp": "How many polyps are in the image?",
    "ab_color": "What color is the abnormality? If more than one separate with ;",
    "ab_loc": "Where in the image is the abnormality?",
    "ab": "Are there any abnormalities in the image? Check all that are present.",
    "finding": "Does this image contain any finding?",
    "lm": "Are there any anatomical landmarks in the image? Check all that are present.",
    "lm_loc": "Where in the image is the anatomical landmark?",
    "lm_color": "What color is the anatomical landmark? If more than one separate with ;",
    "easy": "Is this finding easy to detect?",
}


@dataclass
class Frame:
    img_id: str
    category: str
    jpeg: bytes
    rows: list[tuple[str, str]] = field(default_factory=list)


def img_id_for(seed: int, index: int) -> str:
    """A Labelbox-cuid-like id (25 lowercase alphanumerics starting with 'cl')."""
    return "cl" + stable_hash(seed, "sample-image", index)[:23]


def grid_cells(mask: np.ndarray, min_cell_fraction: float = 0.04, min_object_fraction: float = 0.2) -> list[str]:
    """Cells of the 3x3 grid that the object covers: at least `min_cell_fraction` of the cell's area, or
    at least `min_object_fraction` of the object (so a small lesion still has a location)."""
    h, w = mask.shape
    total = max(int(mask.sum()), 1)
    cells = []
    for r in range(3):
        for c in range(3):
            cell = mask[r * h // 3:(r + 1) * h // 3, c * w // 3:(c + 1) * w // 3]
            if cell.mean() >= min_cell_fraction or cell.sum() / total >= min_object_fraction:
                cells.append(GRID[r][c])
    return cells


def join_values(values: list[str], rng: np.random.Generator) -> str:
    """Join as the real labels do: any order, mostly '; ', sometimes ';'."""
    values = [values[i] for i in rng.permutation(len(values))]
    return (";" if rng.random() < 0.15 else "; ").join(values)


def mucosa(rng: np.random.Generator, base: tuple[int, int, int]) -> np.ndarray:
    """Pinkish mucosa: smooth low-frequency shading, fine grain, vessels, dark circular field of view."""
    low = rng.normal(0, 1, (8, 10)).astype(np.float32)
    low_img = Image.fromarray(np.uint8(np.clip(128 + 40 * low, 0, 255))).resize((WIDTH, HEIGHT), Image.BICUBIC)
    # One luminance field, tinted towards red, so the shading stays mucosa-coloured.
    shade = (np.asarray(low_img, np.float32)[..., None] - 128) * np.array([0.7, 0.5, 0.45], np.float32)
    img = np.array(base, np.float32)[None, None, :] + shade + rng.normal(0, 4, (HEIGHT, WIDTH, 3))
    canvas = Image.fromarray(np.uint8(np.clip(img, 0, 255)))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(4, 9))):
        pts = [(float(rng.uniform(0, WIDTH)), float(rng.uniform(0, HEIGHT)))]
        for _ in range(6):
            x, y = pts[-1]
            pts.append((x + float(rng.normal(0, 25)), y + float(rng.normal(0, 25))))
        draw.line(pts, fill=(150, 50, 55), width=int(rng.integers(1, 3)))
    arr = np.asarray(canvas.filter(ImageFilter.GaussianBlur(1.2)), np.float32)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    r = np.hypot((xx - WIDTH / 2) / (WIDTH / 2), (yy - HEIGHT / 2) / (HEIGHT / 2))
    light = np.clip(1.25 - 0.55 * r ** 2, 0, 1)[..., None]
    arr = arr * light
    arr[r > 1.12] = 0
    return arr


def draw_blob(arr: np.ndarray, cx: float, cy: float, rx: float, ry: float, colour: tuple[int, int, int]) -> np.ndarray:
    """A shaded dome (polyp-like lesion); returns its mask."""
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    d = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2
    mask = d <= 1
    dome = np.sqrt(np.clip(1 - d, 0, 1))[..., None]
    lit = np.array(colour, np.float32) * (0.75 + 0.35 * dome)
    arr[mask] = (0.15 * arr + 0.85 * lit)[mask]
    hx, hy = int(cx - rx * 0.3), int(cy - ry * 0.35)
    arr[max(hy - 2, 0):hy + 2, max(hx - 3, 0):hx + 3] = 245  # specular highlight
    return mask


def draw_patches(arr: np.ndarray, rng: np.random.Generator, n: int, colour: tuple[int, int, int],
                 region: tuple[float, float, float, float]) -> np.ndarray:
    """Irregular inflamed patches inside region (x0, y0, x1, y1 as fractions); returns their mask."""
    mask = np.zeros((HEIGHT, WIDTH), bool)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    x0, y0, x1, y1 = region
    for _ in range(n):
        cx, cy = rng.uniform(x0, x1) * WIDTH, rng.uniform(y0, y1) * HEIGHT
        rx, ry = rng.uniform(15, 40), rng.uniform(10, 30)
        mask |= ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
    arr[mask] = 0.4 * arr[mask] + 0.6 * np.array(colour, np.float32)
    return mask


def draw_instrument(canvas: Image.Image, rng: np.random.Generator, kind: str) -> np.ndarray:
    """A grey tube (or forceps with jaws) entering from the lower-left or lower-right; returns its mask."""
    mask_img = Image.new("L", canvas.size, 0)
    from_right = rng.random() < 0.5
    x0 = WIDTH + 10 if from_right else -10
    tip = (float(rng.uniform(0.35, 0.6)) * WIDTH, float(rng.uniform(0.3, 0.55)) * HEIGHT)
    start = (x0, HEIGHT * float(rng.uniform(0.75, 1.0)))
    width = int(rng.integers(18, 30))
    for target, fill in ((canvas, (170, 172, 178)), (mask_img, 255)):
        d = ImageDraw.Draw(target)
        d.line([start, tip], fill=fill, width=width)
        if kind == "biopsy forceps":
            d.polygon([tip, (tip[0] - 18, tip[1] - 22), (tip[0] + 4, tip[1] - 6)], fill=fill)
            d.polygon([tip, (tip[0] + 18, tip[1] - 22), (tip[0] - 4, tip[1] - 6)], fill=fill)
    ImageDraw.Draw(canvas).line([start, tip], fill=(225, 228, 232), width=3)  # metallic highlight
    return np.asarray(mask_img) > 0


def overlay_text_and_box(canvas: Image.Image, rng: np.random.Generator, text: bool, box: bool) -> None:
    """On-screen text at the upper left and the green/black position box at the lower left, as on real frames."""
    d = ImageDraw.Draw(canvas)
    if text:
        font = ImageFont.load_default(size=11)
        day, hh, mm = int(rng.integers(1, 28)), int(rng.integers(7, 18)), int(rng.integers(0, 60))
        d.text((6, 6), f"{day:02d}/03/2026\n{hh:02d}:{mm:02d}\nCVP", fill=(235, 235, 235), font=font)
    if box:
        d.rectangle([4, HEIGHT - 74, 74, HEIGHT - 4], fill=(0, 0, 0))
        d.rectangle([14, HEIGHT - 62, 52, HEIGHT - 18], outline=(40, 200, 60), width=3)


def size_label(radius_px: float) -> str:
    """Polyp size from its radius at the sample's notional scale of 2.2 px per mm."""
    mm = 2 * radius_px / 2.2
    return "<5mm" if mm < 5 else "5-10mm" if mm <= 10 else "11-20mm" if mm <= 20 else ">20mm"


def make_frame(seed: int, index: int, category: str) -> Frame:
    rng = rng_for(seed, "sample-frame", index)
    img_id = img_id_for(seed, index)
    upper = category == "Esophagitis" or (category == "Normal" and rng.random() < 0.4)
    arr = mucosa(rng, (205, 120, 112) if not upper else (215, 135, 125))
    rows: dict[str, str] = {}
    abnormalities, ab_mask, ab_colours = [], np.zeros((HEIGHT, WIDTH), bool), []
    polyps: list[tuple[str, str]] = []
    if category == "Polyps" or (category == "Instrument" and rng.random() < 0.5):
        for _ in range(1 if rng.random() < 0.8 else 2):
            r = float(rng.uniform(8, 38))
            cx, cy = rng.uniform(0.25, 0.75) * WIDTH, rng.uniform(0.25, 0.75) * HEIGHT
            ab_mask |= draw_blob(arr, cx, cy, r, r * float(rng.uniform(0.7, 1.0)), (230, 140, 135))
            ptype = "paris ip" if r > 26 else "paris is" if r > 14 else "paris iia"
            polyps.append((ptype, size_label(r)))
        abnormalities.append("polyp")
        ab_colours += ["pink", "red"]
    if category == "Ulcerative Colitis":
        ab_mask |= draw_patches(arr, rng, int(rng.integers(5, 10)), (170, 40, 45), (0.1, 0.1, 0.9, 0.9))
        ab_mask |= draw_patches(arr, rng, 3, (240, 235, 215), (0.2, 0.2, 0.8, 0.8))
        abnormalities.append("ulcerative colitis")
        ab_colours += ["red", "white", "pink"]
    if category == "Esophagitis":
        ab_mask |= draw_patches(arr, rng, int(rng.integers(3, 6)), (185, 50, 50), (0.25, 0.45, 0.75, 0.85))
        abnormalities.append("oesophagitis")
        ab_colours += ["red", "pink"]
    landmark, lm_mask = "none", np.zeros((HEIGHT, WIDTH), bool)
    if category in ("Esophagitis", "Normal"):
        landmark = "z-line" if upper else ("cecum" if rng.random() < 0.6 else "ileum")
        yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
        ring = np.abs(np.hypot(xx - WIDTH / 2, (yy - HEIGHT * 0.55) * 1.3) - 70) < 6
        arr[ring] = 0.5 * arr[ring] + 0.5 * np.array((245, 190, 180), np.float32)
        lm_mask = np.hypot(xx - WIDTH / 2, (yy - HEIGHT * 0.55) * 1.3) < 76
    canvas = Image.fromarray(np.uint8(np.clip(arr, 0, 255)))
    instruments, instr_mask = [], np.zeros((HEIGHT, WIDTH), bool)
    if category == "Instrument":
        kind = "tube" if rng.random() < 0.7 else "biopsy forceps"
        instr_mask = draw_instrument(canvas, rng, kind)
        instruments.append(kind)
    has_text, has_box = bool(rng.random() < 0.75), bool(rng.random() < 0.45)
    overlay_text_and_box(canvas, rng, has_text, has_box)

    procedure = "gastroscopy" if upper else "colonoscopy"
    if category == "Normal":
        rows["finding"] = "no"
    else:
        rows.update({
            "procedure": procedure, "text": "yes" if has_text else "no", "box": "yes" if has_box else "no",
            "n_instr": str(len(instruments)), "n_find": str(len(abnormalities) + len(polyps) - (1 if polyps else 0)),
            "instr": join_values(instruments, rng) if instruments else "none",
            "instr_loc": (join_values(grid_cells(instr_mask), rng).replace("lower-right", "lower-rigth")
                          if instruments else "none"),
            "n_polyp": str(len(polyps)), "removed": "no" if polyps else "not relevant",
            "ab": join_values(abnormalities, rng) if abnormalities else "none",
            "ab_loc": join_values(grid_cells(ab_mask), rng) if abnormalities else "none",
            "ab_color": join_values(sorted(set(ab_colours)), rng) if abnormalities else "none",
            "lm": landmark, "easy": "yes" if rng.random() < 0.7 else "no",
        })
        if landmark != "none":
            rows["lm_loc"] = join_values(grid_cells(lm_mask), rng).replace("lower-right", "lower-rigth")
            rows["lm_color"] = "pink; white"
        else:
            rows["lm_loc"] = "none"
        if not polyps:
            rows["ptype"], rows["psize"] = "none", "none"
    # Real labels list a subset of the questions per image; keep each with probability 0.85.
    kept = [(Q[k], v) for k, v in rows.items() if len(rows) == 1 or rng.random() < 0.85]
    for ptype, psize in polyps:  # one row per polyp, as in the real file
        kept.append((Q["ptype"], ptype))
        kept.append((Q["psize"], psize.replace(">20mm", ">20") if rng.random() < 0.5 else psize))
    if rng.random() < 0.08:
        kept.append(("none", ""))
    order = rng.permutation(len(kept))
    buf = io.BytesIO()
    canvas.save(buf, format="JPEG", quality=88)
    return Frame(img_id, category, buf.getvalue(), [kept[i] for i in order])


# HyperKvasir's 23 labelled folders: (tract folder, classification, finding as in the CSV, folder name).
HK_FINDINGS = [
    ("lower-gi-tract", "anatomical-landmarks", f, f) for f in ("cecum", "ileum", "retroflex-rectum")
] + [
    ("lower-gi-tract", "pathological-findings", f, "polyp" if f == "polyps" else f)
    for f in ("hemorrhoids", "polyps", "ulcerative-colitis-grade-0-1", "ulcerative-colitis-grade-1",
              "ulcerative-colitis-grade-1-2", "ulcerative-colitis-grade-2", "ulcerative-colitis-grade-2-3",
              "ulcerative-colitis-grade-3")
] + [
    ("lower-gi-tract", "quality-of-mucosal-views", f, f) for f in ("bbps-0-1", "bbps-2-3", "impacted-stool")
] + [
    ("lower-gi-tract", "therapeutic-interventions", f, f) for f in ("dyed-lifted-polyps", "dyed-resection-margins")
] + [
    ("upper-gi-tract", "anatomical-landmarks", f, f) for f in ("pylorus", "retroflex-stomach", "z-line")
] + [
    ("upper-gi-tract", "pathological-findings", f, f)
    for f in ("barretts", "barretts-short-segment", "esophagitis-a", "esophagitis-b-d")
]
HK_TWICE = {"polyps", "bbps-2-3", "ulcerative-colitis-grade-2", "dyed-lifted-polyps"}
ORGAN = {"lower-gi-tract": "Lower GI", "upper-gi-tract": "Upper GI"}


def hk_id_for(seed: int, index: int) -> str:
    """A HyperKvasir-like UUID."""
    h = stable_hash(seed, "sample-hk-image", index)
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def mask_box(mask: np.ndarray) -> dict:
    """The HyperKvasir box convention: one pixel outside the object on each side, clipped to the image."""
    ys, xs = np.nonzero(mask)
    return {"label": "polyp", "xmin": max(int(xs.min()) - 1, 0), "ymin": max(int(ys.min()) - 1, 0),
            "xmax": min(int(xs.max()) + 1, WIDTH), "ymax": min(int(ys.max()) + 1, HEIGHT)}


def make_hk_frame(seed: int, index: int, tract: str, finding: str) -> tuple[bytes, list[dict]]:
    """A frame drawn for a HyperKvasir finding; returns (JPEG bytes, polyp boxes)."""
    rng = rng_for(seed, "sample-hk-frame", index)
    arr = mucosa(rng, (215, 135, 125) if tract == "upper-gi-tract" else (205, 120, 112))
    boxes = []
    if finding in ("polyps", "dyed-lifted-polyps"):
        colour = (230, 140, 135) if finding == "polyps" else (120, 130, 210)  # indigo carmine under the lift
        for _ in range(1 if rng.random() < 0.7 else 2):
            r = float(rng.uniform(10, 36))
            cx, cy = rng.uniform(0.2, 0.8) * WIDTH, rng.uniform(0.2, 0.8) * HEIGHT
            boxes.append(mask_box(draw_blob(arr, cx, cy, r, r * float(rng.uniform(0.7, 1.0)), colour)))
    elif finding.startswith("ulcerative-colitis"):
        draw_patches(arr, rng, int(rng.integers(3, 9)), (170, 40, 45), (0.1, 0.1, 0.9, 0.9))
    elif finding.startswith("esophagitis") or finding.startswith("barretts"):
        draw_patches(arr, rng, int(rng.integers(2, 5)), (185, 60, 50), (0.25, 0.45, 0.75, 0.85))
    elif finding in ("bbps-0-1", "impacted-stool"):
        draw_patches(arr, rng, 6 if finding == "bbps-0-1" else 3, (120, 90, 40), (0.1, 0.1, 0.9, 0.9))
    elif finding == "dyed-resection-margins":
        draw_patches(arr, rng, 2, (110, 120, 200), (0.3, 0.3, 0.7, 0.7))
    elif finding == "hemorrhoids":
        draw_patches(arr, rng, 3, (140, 50, 90), (0.2, 0.5, 0.8, 0.9))
    canvas = Image.fromarray(np.uint8(np.clip(arr, 0, 255)))
    if finding.startswith("retroflex"):  # the scope seen from inside, looking back
        ImageDraw.Draw(canvas).ellipse([WIDTH * 0.4, HEIGHT * 0.45, WIDTH * 0.62, HEIGHT * 0.72], fill=(40, 40, 45))
    overlay_text_and_box(canvas, rng, bool(rng.random() < 0.6), bool(rng.random() < 0.4))
    buf = io.BytesIO()
    canvas.save(buf, format="JPEG", quality=88)
    return buf.getvalue(), boxes


def write_hyperkvasir_sample(out_dir: Path, seed: int) -> None:
    """`hyper-kvasir/`: labels, folders, boxes and the 23-folder image tree, with deliberate faults."""
    rows, boxes, index = [], {}, 0
    for tract, classification, finding, folder in HK_FINDINGS:
        for _ in range(2 if finding in HK_TWICE else 1):
            img_id = hk_id_for(seed, index)
            jpeg, polyp_boxes = make_hk_frame(seed, index, tract, finding)
            index += 1
            rows.append([img_id, ORGAN[tract], finding, classification])
            if polyp_boxes and finding == "polyps":  # the segmented images are the polyp folder's
                boxes[img_id] = {"height": HEIGHT, "width": WIDTH, "bbox": polyp_boxes}
            if finding != "hemorrhoids":  # this labelled image's file is missing
                path = out_dir / "labeled-images" / tract / classification / folder / f"{img_id}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(path) as tmp:
                    tmp.write_bytes(jpeg)
    rows.insert(5, [rows[2][0], rows[2][1], rows[2][2], rows[2][3]])        # duplicated id
    rows.append([hk_id_for(seed, 900), "Upper GI", "cecum", "anatomical-landmarks"])  # organ contradicts finding
    rows.append([hk_id_for(seed, 901), "Lower GI", "polyps"])               # a short row
    bad = [k for k, entry in boxes.items() if len(entry["bbox"]) == 1][0]
    boxes[bad]["bbox"].append({"label": "polyp", "xmin": 350, "ymin": 300, "xmax": 420, "ymax": 330})  # off the image
    boxes[hk_id_for(seed, 902)] = {"height": HEIGHT, "width": WIDTH,      # boxes without a label row
                                   "bbox": [{"label": "polyp", "xmin": 10, "ymin": 10, "xmax": 60, "ymax": 50}]}
    with atomic_path(out_dir / "image-labels.csv") as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["Video file", "Organ", "Finding", "Classification"])
            w.writerows(rows)
    with atomic_path(out_dir / "folders.json") as tmp:
        tmp.write_text(json.dumps([f"labeled-images/{t}/{c}/{d}" for t, c, _, d in HK_FINDINGS]) + "\n")
    with atomic_path(out_dir / "bounding-boxes.json") as tmp:
        tmp.write_text(json.dumps(boxes, indent=1) + "\n")


def write_sample(out_dir: Path = SAMPLE_DIR, seed: int = 2026) -> Path:
    """Write `metadata.csv`, `images/<img_id>.jpg` and `hyper-kvasir/`; same seed -> same bytes."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    frames, index = [], 0
    for category, n in CATEGORIES:
        for _ in range(n):
            frames.append(make_frame(seed, index, category))
            index += 1
    with atomic_path(out_dir / "metadata.csv") as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["source", "question", "answer", "img_id"])
            for fr in frames:
                for q, a in fr.rows:
                    w.writerow([fr.category, q, a, fr.img_id])
    for fr in frames:
        with atomic_path(out_dir / "images" / f"{fr.img_id}.jpg") as tmp:
            tmp.write_bytes(fr.jpeg)
    write_hyperkvasir_sample(out_dir / "hyper-kvasir", seed)
    return out_dir


if __name__ == "__main__":
    print(f"wrote {write_sample()}")
