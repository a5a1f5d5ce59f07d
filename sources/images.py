"""Image inventory: find, hash and fully decode every image a source's facts refer to.

An image that is missing, unreadable, truncated or not a still image is quarantined with its reason here,
so that publishing (and augmentation) only ever sees images that decode. Decoding fully (`load()`, not
just `verify()`) is what catches a JPEG cut short by a broken download.

Memory. The pixel count is read from the header before anything is decoded: an image over its source's
`max_pixels` is quarantined as `too_large` without being decoded (a 280 kB single-colour PNG can hold
9,400 x 9,400 pixels, 265 MB decoded and gigabytes through augmentation). The file is hashed in blocks.

Orientation. Everything downstream uses the *displayed* orientation, the one `datasets` decodes (it
applies the EXIF orientation tag) and the augmented track renders (`augment.render.decode_image`
applies it too): `width` and `height` below are the displayed size. The release embeds the original
bytes unchanged, so it shows the same picture. Box coordinates cannot be trusted on a rotated file: no
box source says whether its boxes were drawn on the stored or the displayed pixels, so an image with an
EXIF orientation other than 1 that has boxes is quarantined (`rotated_image_with_boxes`); without boxes
it is kept (its grid labels, like every label, refer to the picture as displayed).

Images table (`stages/images.parquet`):

| column | type | meaning |
|---|---|---|
| source | str | source name |
| img_id | str | image id |
| path | str | absolute path of the file |
| sha256 | str | digest of the file's bytes (what the release embeds, unchanged) |
| format | str | PIL format (JPEG, PNG) |
| width, height | int | pixel size as displayed (after the EXIF orientation) |
| n_bytes | int | file size |
| fingerprint | str | perceptual fingerprint of the whole picture as displayed: 256 bits as 64 hex digits (below) |
| window_fingerprints | str | the same fingerprint of 5 crop windows of the picture, 5 x 64 hex digits |

Fingerprint. Frames of one video scene, re-encoded, resized, cropped, brightened or slightly rotated
copies must stay in one split (`dedup.frames`, `publish.split`), so each usable image gets a perceptual
fingerprint here, where it is decoded anyway (the table is the cache: it is recomputed only when this stage
reruns). The picture, turned to its displayed orientation, is box-reduced to at most 128 px (memory stays
bounded: the full-size copy is never duplicated) and 256 bits are taken from it with `imagehash` 4.3.2:
horizontal and vertical difference hashes (`dhash`, `dhash_vertical`) and the DCT hash (`phash`) of the
luminance, 64 bits each, and the horizontal difference hash of a red-green chroma image (64 bits: the
colour of a lesion tells frames apart that luminance does not). Every hash here is coarse (an 8 x 8 grid),
so it survives re-encoding, resizing, brightness and a few degrees of rotation; a crop moves the grid, so
the same 256 bits are also taken of `FINGERPRINT_WINDOWS` (the four corner windows of 92.5 % of each side
and the central 90 %): a copy cropped by 5-10 % is near one of its original's windows. Calibration and
distances: docs/design.md, Splits.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable

import imagehash
import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from kvqa.config import DEFAULT_MAX_PIXELS, SourceConfig
from kvqa.fanout import contiguous_chunks
from kvqa.tables import file_digest, quarantine_frame
from sources.common import bad_id

IMAGE_COLUMNS = ["source", "img_id", "path", "sha256", "format", "width", "height", "n_bytes", "fingerprint",
                 "window_fingerprints"]
ALLOWED_FORMATS = {"JPEG", "PNG"}
STAGE = "images"
EXIF_ORIENTATION = 0x0112
SWAPPED_ORIENTATIONS = {5, 6, 7, 8}  # transpose / rotate 270 / transverse / rotate 90: width and height swap
# What `ImageOps.exif_transpose` applies for each orientation, applied here to the reduced picture.
ORIENTATION_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                         4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                         6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}
FINGERPRINT_SIDE = 128  # the reduced picture's longer side, in pixels (the hashes read 8 x 8 to 32 x 32)
# Crop windows (left, top, right, bottom as fractions of the picture): four corners of 92.5 % and the
# central 90 %. Calibrated with the crops, rotations and re-encodings of README's Splits section.
FINGERPRINT_WINDOWS = ((0.0, 0.0, 0.925, 0.925), (0.075, 0.0, 1.0, 0.925), (0.0, 0.075, 0.925, 1.0),
                       (0.075, 0.075, 1.0, 1.0), (0.05, 0.05, 0.95, 0.95))


class ImageError(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def find_image(image_dir: Path, img_id: str, extensions: tuple[str, ...]) -> Path | None:
    for ext in extensions:
        for cand in (image_dir / f"{img_id}{ext}", image_dir / f"{img_id}{ext.upper()}"):
            if cand.is_file():
                return cand
    return None


def image_index(image_dir: Path, extensions: tuple[str, ...]) -> dict[str, list[Path]]:
    """Every image file under `image_dir` (any depth: the HyperKvasir download's 23-folder layout) by stem."""
    exts = {e.lower() for e in extensions}
    index: dict[str, list[Path]] = {}
    for folder, _, files in sorted(os.walk(image_dir)):
        for name in sorted(files):
            p = Path(folder) / name
            if p.suffix.lower() in exts:
                index.setdefault(p.stem, []).append(p)
    return index


def exif_orientation(im: Image.Image) -> int:
    """The EXIF orientation tag (1 = as stored; 2-8 as `ImageOps.exif_transpose` applies them)."""
    try:
        value = im.getexif().get(EXIF_ORIENTATION, 1)
    except (OSError, SyntaxError, ValueError):  # a broken EXIF block: nothing to apply
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _reduced_rgb(im: Image.Image, orientation: int) -> Image.Image:
    """The picture as displayed, 8-bit RGB, box-reduced to at most FINGERPRINT_SIDE px on its longer side.

    The reduction comes first, from the decoded pixels, so no full-size converted copy is ever made (a
    palette or CMYK image is converted first: Pillow reduces only plain modes). Grayscale of 16 bits is
    scaled to 8 and transparency is composited over black, as the augmented track renders them."""
    if im.mode not in {"1", "L", "LA", "RGB", "RGBA", "I", "F", "I;16", "I;16B", "I;16L"}:
        im = im.convert("RGBA" if "transparency" in im.info or im.mode == "PA" else "RGB")
    elif im.mode == "1":
        im = im.convert("L")
    elif im.mode.startswith("I;16"):
        im = im.convert("I")
    scale = FINGERPRINT_SIDE / max(im.size)
    if scale < 1:
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.Resampling.BOX)
    if im.mode in {"I", "F"}:
        arr = np.asarray(im, dtype=np.float64)
        im = Image.fromarray(np.clip(np.rint(arr / 257.0 if arr.max(initial=0) > 255 else arr), 0, 255)
                             .astype(np.uint8))
    if im.mode in {"LA", "RGBA"}:
        im = Image.alpha_composite(Image.new("RGBA", im.size, (0, 0, 0, 255)), im.convert("RGBA"))
    im = im.convert("RGB")
    return im.transpose(ORIENTATION_TRANSPOSE[orientation]) if orientation in ORIENTATION_TRANSPOSE else im


def _hash_bits(luma: Image.Image, chroma: Image.Image) -> np.ndarray:
    """256 bits of one picture given as its luminance and red-green chroma: dhash, vertical dhash and
    phash of the luminance, dhash of the chroma."""
    hashes = (imagehash.dhash(luma, 8), imagehash.dhash_vertical(luma, 8), imagehash.phash(luma, 8),
              imagehash.dhash(chroma, 8))
    return np.concatenate([h.hash.ravel() for h in hashes])


def frame_fingerprints(im: Image.Image, orientation: int = 1) -> tuple[str, str]:
    """(fingerprint, window_fingerprints) of a decoded picture, as hex (see the module docstring)."""
    picture = _reduced_rgb(im, orientation)
    rgb = np.asarray(picture, dtype=np.int16)
    luma = picture.convert("L")
    chroma = Image.fromarray(((rgb[..., 0] - rgb[..., 1]) // 2 + 128).clip(0, 255).astype(np.uint8))
    w, h = picture.size
    boxes = [(round(l * w), round(t * h), max(round(r * w), round(l * w) + 1), max(round(b * h), round(t * h) + 1))
             for l, t, r, b in FINGERPRINT_WINDOWS]
    whole = np.packbits(_hash_bits(luma, chroma)).tobytes().hex()
    return whole, "".join(np.packbits(_hash_bits(luma.crop(box), chroma.crop(box))).tobytes().hex() for box in boxes)


def check_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    """Hash, fully decode and fingerprint one image file; raise ImageError with a reason if it is not usable.

    The size is checked from the header first: an image over `max_pixels` is never decoded.
    """
    n_bytes = path.stat().st_size
    if not n_bytes:
        raise ImageError("empty_image", f"{path.name} is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                fmt = im.format
                if im.width * im.height > max_pixels:
                    raise ImageError("too_large", f"{path.name} is {im.width}x{im.height} "
                                                  f"({im.width * im.height:,} pixels), over max_pixels {max_pixels:,}")
                im.load()
                orientation = exif_orientation(im)
                width, height = im.size[::-1] if orientation in SWAPPED_ORIENTATIONS else im.size
                fingerprint, window_fingerprints = frame_fingerprints(im, orientation)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:  # over Pillow's own limit
        raise ImageError("too_large", f"{path.name}: {err}") from err
    except UnidentifiedImageError as err:
        raise ImageError("unreadable_image", f"{path.name}: {err}") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageError("corrupt_image", f"{path.name}: {err}") from err
    if fmt not in ALLOWED_FORMATS:
        raise ImageError("unsupported_format", f"{path.name} is {fmt}, expected one of {sorted(ALLOWED_FORMATS)}")
    return {"sha256": file_digest(path), "format": fmt, "width": width, "height": height, "n_bytes": n_bytes,
            "orientation": orientation, "fingerprint": fingerprint, "window_fingerprints": window_fingerprints}


def images_with_boxes(facts: pd.DataFrame) -> set[tuple[str, str]]:
    """(source, img_id) of every image that has a fact with boxes."""
    if "boxes" not in facts.columns:
        return set()
    return {(s, i) for s, i, b in zip(facts["source"], facts["img_id"], facts["boxes"]) if b is not None and len(b)}


ChunkMap = Callable[[Callable, list[list[dict]]], list]  # (fn, chunks) -> [fn(chunk) for chunk in chunks]


def locate_images(wanted: pd.DataFrame, sources: list[SourceConfig]) -> tuple[list[dict], list[dict]]:
    """Find the file of every (source, img_id) in `wanted`, in (source, img_id) order: (located rows to
    check, quarantined rows). Cheap: names and folder listings only; `check_located` does the decoding."""
    by_name = {s.name: s for s in sources}
    boxed = images_with_boxes(wanted)
    trees = {s.name: image_index(Path(s.image_dir), s.image_extensions) for s in sources if s.recursive_images}
    keys = wanted[["source", "img_id"]].drop_duplicates().sort_values(["source", "img_id"])
    located, bad = [], []
    for order, (source, img_id) in enumerate(keys.itertuples(index=False, name=None)):
        src = by_name[source]
        why_bad = bad_id(img_id)  # never build a path from an id the readers would not have let through
        if why_bad:
            found, path = [], None
        elif source in trees:
            found = trees[source].get(img_id, [])
            path = found[0] if len(found) == 1 else None
        else:
            found, path = [], find_image(Path(src.image_dir), img_id, src.image_extensions)
        if why_bad:
            err = ImageError("bad_id", why_bad)
        elif len(found) > 1:
            err = ImageError("ambiguous_image", f"{len(found)} files for {img_id}: {[str(p) for p in found]}")
        elif path is None:
            where = f"{src.image_dir} or its subfolders" if source in trees else str(src.image_dir)
            err = ImageError("missing_image", f"no {img_id}{{{','.join(src.image_extensions)}}} in {where}")
        else:
            located.append({"order": order, "source": source, "img_id": img_id, "path": str(path),
                            "max_pixels": src.max_pixels, "boxed": (source, img_id) in boxed})
            continue
        bad.append(_quarantined(order, source, img_id, err, path))
    return located, bad


def _quarantined(order: int, source: str, img_id: str, err: ImageError, path) -> dict:
    return {"order": order, "stage": STAGE, "source": source, "key": img_id, "reason": err.reason,
            "detail": str(err), "raw": str(path or "")}


def check_located(chunk: list[dict]) -> tuple[list[dict], list[dict]]:
    """Hash, fully decode and fingerprint a chunk of located images (the costly part of the inventory,
    mapped over workers): (usable rows, quarantined rows), each with its `order`."""
    ok, bad = [], []
    for row in chunk:
        path = Path(row["path"])
        try:
            checked = check_image(path, row["max_pixels"])
            if checked["orientation"] != 1 and row["boxed"]:
                raise ImageError("rotated_image_with_boxes",
                                 f"{path.name} has EXIF orientation {checked['orientation']} (displayed "
                                 f"{checked['width']}x{checked['height']}) and boxes: no box source says whether "
                                 "they are drawn on the stored or the displayed pixels")
            ok.append({"order": row["order"], "source": row["source"], "img_id": row["img_id"],
                       "path": str(path), **checked})
        except ImageError as err:
            bad.append(_quarantined(row["order"], row["source"], row["img_id"], err, path))
    return ok, bad


def check_here(fn: Callable, chunks: list[list[dict]]) -> list:
    """The in-process `ChunkMap`, with a progress bar over the images."""
    total = sum(map(len, chunks))
    with tqdm(total=total, desc="check images", unit="img", mininterval=1.0, disable=total < 500) as bar:
        results = []
        for chunk in chunks:
            results.append(fn(chunk))
            bar.update(len(chunk))
    return results


def inventory_images(wanted: pd.DataFrame, sources: list[SourceConfig], *, chunks: int = 0,
                     map_chunks: ChunkMap = check_here) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Check every (source, img_id) in `wanted` (the facts table); return (usable images, quarantined images).

    The located images are checked in `chunks` contiguous chunks (0: one per 64 images) through
    `map_chunks` (in this process by default; the flows map them over Dask workers). Rows come back in
    (source, img_id) order whichever way they were checked."""
    located, bad = locate_images(wanted, sources)
    parts = contiguous_chunks(located, chunks or -(-len(located) // 64))
    ok = []
    for good, failed in map_chunks(check_located, parts):
        ok += good
        bad += failed
    ok.sort(key=lambda r: r["order"])
    bad.sort(key=lambda r: r["order"])
    return (pd.DataFrame(ok, columns=IMAGE_COLUMNS),
            quarantine_frame(bad))
