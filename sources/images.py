"""Image inventory: find, hash and fully decode every image a source's facts refer to.

An image that is missing, unreadable, truncated or not a still image is quarantined with its reason here,
so that publishing (and augmentation) only ever sees images that decode. Decoding fully (`load()`, not
just `verify()`) is what catches a JPEG cut short by a broken download.

Images table (`stages/images.parquet`):

| column | type | meaning |
|---|---|---|
| source | str | source name |
| img_id | str | image id |
| path | str | absolute path of the file |
| sha256 | str | digest of the file's bytes (what the release embeds, unchanged) |
| format | str | PIL format (JPEG, PNG) |
| width, height | int | pixel size |
| n_bytes | int | file size |
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import pandas as pd
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from kvqa.config import SourceConfig
from kvqa.tables import quarantine_frame
from sources.common import bad_id

IMAGE_COLUMNS = ["source", "img_id", "path", "sha256", "format", "width", "height", "n_bytes"]
ALLOWED_FORMATS = {"JPEG", "PNG"}
STAGE = "images"


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


def check_image(path: Path) -> dict:
    """Hash and fully decode one image file; raise ImageError with a reason if it is not usable."""
    data = path.read_bytes()
    if not data:
        raise ImageError("empty_image", f"{path.name} is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                fmt = im.format
                im.load()
                width, height = im.size
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError("unreadable_image", f"{path.name}: {err}") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageError("corrupt_image", f"{path.name}: {err}") from err
    if fmt not in ALLOWED_FORMATS:
        raise ImageError("unsupported_format", f"{path.name} is {fmt}, expected one of {sorted(ALLOWED_FORMATS)}")
    return {"sha256": hashlib.sha256(data).hexdigest(), "format": fmt, "width": width, "height": height,
            "n_bytes": len(data)}


def inventory_images(wanted: pd.DataFrame, sources: list[SourceConfig]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Check every (source, img_id) in `wanted`; return (usable images, quarantined images)."""
    by_name = {s.name: s for s in sources}
    trees = {s.name: image_index(Path(s.image_dir), s.image_extensions) for s in sources if s.recursive_images}
    keys = wanted[["source", "img_id"]].drop_duplicates().sort_values(["source", "img_id"])
    ok, bad = [], []
    for source, img_id in tqdm(list(keys.itertuples(index=False, name=None)), desc="check images",
                               unit="img", mininterval=1.0, disable=len(keys) < 500):
        src = by_name[source]
        why_bad = bad_id(img_id)  # never build a path from an id the readers would not have let through
        if why_bad:
            found, path = [], None
        elif source in trees:
            found = trees[source].get(img_id, [])
            path = found[0] if len(found) == 1 else None
        else:
            found, path = [], find_image(Path(src.image_dir), img_id, src.image_extensions)
        try:
            if why_bad:
                raise ImageError("bad_id", why_bad)
            if len(found) > 1:
                raise ImageError("ambiguous_image", f"{len(found)} files for {img_id}: {[str(p) for p in found]}")
            if path is None:
                where = f"{src.image_dir} or its subfolders" if source in trees else str(src.image_dir)
                raise ImageError("missing_image", f"no {img_id}{{{','.join(src.image_extensions)}}} in {where}")
            ok.append({"source": source, "img_id": img_id, "path": str(path), **check_image(path)})
        except ImageError as err:
            bad.append({"stage": STAGE, "source": source, "key": img_id, "reason": err.reason,
                        "detail": str(err), "raw": str(path or "")})
    return pd.DataFrame(ok, columns=IMAGE_COLUMNS), quarantine_frame(bad)
