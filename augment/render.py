"""Render one augmented variant, record everything it drew, and re-render it from that record alone.

Seeding. albumentations 2.0.8's `Compose(seed=k)` hands the *same* seed to every child, so re-making a
Compose per image makes all children take the same first draw (a crop at p=0.5 fires exactly when the
blur does). Here every step gets its own seed, `sha256(config seed, source, img_id, variant, step name)`,
and steps are applied one by one: draws are independent across steps, images and variants, and do not
depend on process, chunk or order.

Record. A variant's recipe lists, per step: the transform, its keyword arguments for this image, its seed,
whether it fired and the parameters it applied (JSON-safe: arrays such as blur kernels are summarised by
shape, dtype, statistics and a digest). `replay_variant` rebuilds the steps from the recipe, re-seeds them,
re-applies them, checks the applied parameters equal the recorded ones and returns the JPEG bytes, which
equal the recorded output when the same albumentations / OpenCV / Pillow versions are installed (the
recipe names them).

Orientation and size. An input is decoded with its EXIF orientation applied (`ImageOps.exif_transpose`),
the way `datasets` decodes the release's image column, so a variant has the size and orientation of the
picture its release row shows; the JPEG variants carry no orientation tag. The pixel count is checked
from the header before decoding: over `max_pixels` the image is quarantined (`too_large`), undecoded.
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import numpy as np
import PIL
from PIL import Image, ImageOps

from augment.catalog import ArtifactCatalog, build_transform
from kvqa.config import DEFAULT_MAX_PIXELS
from kvqa.tables import stable_hash
from sources.images import exif_orientation

GRAYSCALE_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
VERSIONS = {"albumentations": A.__version__, "opencv": cv2.__version__, "pillow": PIL.__version__}


class AugmentImageError(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True)
class DecodedImage:
    """An input image as an RGB uint8 array, with the mode the variants are written in."""

    pixels: np.ndarray  # in the displayed orientation
    input_mode: str
    output_mode: str  # "L" for grayscale inputs (8- or 16-bit), "RGB" for everything else
    orientation: int = 1  # the input's EXIF orientation, applied to `pixels`


def decode_image(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Fully decode an image, apply its EXIF orientation and convert it to 8-bit RGB.

    Grayscale (incl. 16-bit PNG, scaled, not clipped) is replicated to three channels and written back as
    grayscale; RGBA/LA/transparent palettes are composited over black (the frame's background); palette,
    CMYK and YCbCr become RGB. An image over `max_pixels` (read from the header, before decoding) raises
    AugmentImageError `too_large`; a truncated or undecodable file raises AugmentImageError `corrupt_image`.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                if im.width * im.height > max_pixels:
                    raise AugmentImageError("too_large", f"{name} is {im.width}x{im.height} "
                                            f"({im.width * im.height:,} pixels), over max_pixels {max_pixels:,}")
                im.load()
                mode = im.mode
                orientation = exif_orientation(im)
                rgb = _to_rgb(ImageOps.exif_transpose(im) if orientation != 1 else im)
    except AugmentImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise AugmentImageError("too_large", f"{name}: {err}") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise AugmentImageError("corrupt_image", f"{name}: {err}") from err
    return DecodedImage(np.asarray(rgb), mode, "L" if mode in GRAYSCALE_MODES else "RGB", orientation)


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode.startswith("I") or im.mode == "F":  # 16/32-bit integer or float grayscale
        arr = np.asarray(im, dtype=np.float64)
        if im.mode.startswith("I;16") or (im.mode == "I" and arr.max() > 255):
            arr = arr / 257.0  # 0..65535 -> 0..255, scaled rather than clipped
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8)).convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in {"RGBA", "LA", "PA", "RGBa", "La"}:
        rgba = im.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    return im.convert("RGB")


def step_seed(seed: int, source: str, img_id: str, variant: int, step: str) -> int:
    """An independent 63-bit seed per (config seed, image, variant, step): never from order or process."""
    return int(stable_hash(seed, source, img_id, variant, step)[:16], 16) >> 1


# Significant digits of a recorded float. Derived parameters (albumentations' affine matrices) are numpy
# products whose last bits depend on the SIMD path numpy and OpenBLAS take on the CPU (measured: 14.526970363973248
# vs ...277 with AVX2 disabled), while the pixels do not move: 12 digits record what was applied, not the CPU.
RECORD_DIGITS = 12


def json_safe(value: Any) -> Any:
    """Applied parameters as JSON: arrays larger than 16 values are summarised, numpy scalars unboxed, floats
    to `RECORD_DIGITS` significant digits."""
    if isinstance(value, np.ndarray):
        if value.size <= 16:
            return json_safe(value.tolist())
        return {"ndarray": list(value.shape), "dtype": str(value.dtype),
                "min": json_safe(float(value.min())), "max": json_safe(float(value.max())),
                "mean": round(float(value.mean()), 6),
                "sha256": hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest()[:16]}
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return json_safe(value.item())
    if isinstance(value, float):
        return float(f"{value:.{RECORD_DIGITS}g}")
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    return repr(value)


def plan_recipe(catalog: ArtifactCatalog, seed: int, source: str, img_id: str, variant: int,
                height: int, width: int, geometry: bool = True) -> list[dict]:
    """The steps of one variant with their arguments and seeds, before anything is drawn; without
    `geometry`, only the photometric ones (the image holds an answer that a moved frame would make false
    and that no box can recompute: augment/frames.py). A step's seed does not depend on the others."""
    return [{"name": s.name, "transform": s.transform, "init": s.init_args(height, width),
             "seed": step_seed(seed, source, img_id, variant, s.name)}
            for s in catalog.steps(variant) if geometry or not s.geometric]


# A box stays on a variant while each geometric step leaves at least this share of it in the frame
# (albumentations' `min_visibility`); a box under it is gone from the variant, so are its counts.
MIN_VISIBLE = 0.5


def _built(transforms: dict | None, key: tuple, build):
    if transforms is None:
        return build()
    if key not in transforms:
        transforms[key] = build()
    return transforms[key]


def apply_steps(pixels: np.ndarray, steps: list[dict], transforms: dict | None = None,
                boxes: list[dict] = ()) -> tuple[np.ndarray, list[dict], list[dict]]:
    """Apply the steps one by one, each re-seeded from its own seed; return (pixels, the steps as applied,
    the boxes moved with the pixels).

    `boxes` (label, xmin, ymin, xmax, ymax in pixels) go through each geometric step with the draw that
    moved the pixels (the step wrapped in a Compose with `BboxParams`: the same transform object, so the
    same seed and parameters; the pixels are the same as the step's alone), clipped to the frame, dropped
    under `MIN_VISIBLE`, rounded to whole pixels. `transforms` caches built transforms by (transform, init)
    within a worker: building validates parameters with pydantic, which costs more than applying a cheap step.
    """
    applied = []
    labels = [b["label"] for b in boxes]
    coords = [[b["xmin"], b["ymin"], b["xmax"], b["ymax"]] for b in boxes]  # kept unrounded between steps
    for step in steps:
        key = (step["transform"], json.dumps(step["init"], sort_keys=True))
        t = _built(transforms, key, lambda: build_transform(step["transform"], step["init"]))
        if coords and isinstance(t, A.DualTransform):
            with_boxes = _built(transforms, (*key, "bboxes"), lambda: A.Compose(
                [t], bbox_params=A.BboxParams(format="pascal_voc", label_fields=["box_index"],
                                              min_visibility=MIN_VISIBLE, clip=True)))
            t.set_random_seed(step["seed"])
            out = with_boxes(image=pixels, bboxes=coords, box_index=list(range(len(coords))))
            pixels = out["image"]
            labels = [labels[int(i)] for i in out["box_index"]]
            coords = [[float(v) for v in box] for box in out["bboxes"]]
        else:
            t.set_random_seed(step["seed"])
            pixels = t(image=pixels)["image"]
        params = t.get_applied_params()
        applied.append({**step, "fired": bool(params), "params": json_safe(params)})
    moved = [{"label": label, **{k: int(round(v)) for k, v in zip(("xmin", "ymin", "xmax", "ymax"), box)}}
             for label, box in zip(labels, coords)]
    return pixels, applied, moved


def encode_jpeg(pixels: np.ndarray, mode: str, quality: int) -> bytes:
    """Baseline JPEG, fixed quality and subsampling: the same pixels always give the same bytes."""
    im = Image.fromarray(pixels)
    if mode == "L":
        im = im.convert("L")
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality, subsampling="4:2:0", optimize=False)
    return buf.getvalue()


def make_recipe(applied: list[dict], decoded: DecodedImage, quality: int, input_boxes: list[dict],
                render_code: str) -> str:
    """The variant's record as canonical JSON (the `recipe` column), with the boxes it moved and the digest of
    the code that rendered it (`augment.track.RENDER_CODE`)."""
    return json.dumps({"versions": VERSIONS, "render_code": render_code, "input_mode": decoded.input_mode,
                       "output_mode": decoded.output_mode, "exif_orientation": decoded.orientation,
                       "jpeg_quality": quality, "steps": applied, "input_boxes": input_boxes},
                      sort_keys=True, separators=(",", ":"))


class ReplayMismatch(AssertionError):
    """Re-applying a recorded recipe drew other parameters than the record states."""


def replay_variant(recipe_json: str, image_path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes:
    """Re-render a variant from its recorded recipe and the input file alone (no config, no catalog)."""
    recipe = json.loads(recipe_json)
    decoded = decode_image(Path(image_path).read_bytes(), Path(image_path).name, max_pixels)
    steps = [{k: s[k] for k in ("name", "transform", "init", "seed")} for s in recipe["steps"]]
    pixels, applied, _ = apply_steps(decoded.pixels, steps)
    for want, got in zip(recipe["steps"], applied):
        if json.dumps(want, sort_keys=True) != json.dumps(got, sort_keys=True):
            raise ReplayMismatch(f"step {want['name']}: recorded {want['params']}, replayed {got['params']}")
    return encode_jpeg(pixels, recipe["output_mode"], recipe["jpeg_quality"])
