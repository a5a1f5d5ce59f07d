"""A contact sheet per run: a few images, each followed by its variants, the artifact named under each.

This is the page a person opens to judge whether the artifacts are weak and look like endoscopy, before
anyone trains on the track. The images shown are the first ones by (source, img_id), so the sheet is the
same on every run of the same inputs.
"""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd
from PIL import Image, ImageDraw, ImageFont, ImageOps

LABEL_HEIGHT = 18


def _thumb(path: Path, width: int) -> Image.Image:
    """A thumbnail as displayed (EXIF orientation applied), like the variants beside it."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
        return im.resize((width, max(1, round(im.height * width / im.width))), Image.Resampling.BILINEAR)


def contact_sheet(records: pd.DataFrame, images: pd.DataFrame, run_dir: Path, n_images: int = 4,
                  thumb_width: int = 160) -> bytes | None:
    """PNG bytes of the sheet (None when there is nothing to show): one row per image, original first."""
    if not len(records) or n_images <= 0:
        return None
    keys = records[["source", "img_id"]].drop_duplicates().sort_values(["source", "img_id"]).head(n_images)
    paths = dict(zip(zip(images["source"], images["img_id"]), images["path"]))
    rows = []
    for source, img_id in keys.itertuples(index=False, name=None):
        variants = records[(records["source"] == source) & (records["img_id"] == img_id)].sort_values("variant")
        cells = [(_thumb(Path(paths[(source, img_id)]), thumb_width), f"{img_id[:14]} (input)")]
        cells += [(_thumb(Path(run_dir) / r.output_path, thumb_width), f"{r.variant}: {r.artifact}")
                  for r in variants.itertuples(index=False)]
        rows.append(cells)
    cell_h = max(im.height for row in rows for im, _ in row) + LABEL_HEIGHT
    n_cols = max(len(r) for r in rows)
    sheet = Image.new("RGB", (n_cols * (thumb_width + 4) + 4, len(rows) * (cell_h + 4) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=11)
    for r, row in enumerate(rows):
        for c, (im, label) in enumerate(row):
            x, y = 4 + c * (thumb_width + 4), 4 + r * (cell_h + 4)
            sheet.paste(im, (x, y))
            draw.text((x + 2, y + im.height + 3), label, fill=(0, 0, 0), font=font)
    buf = io.BytesIO()
    sheet.save(buf, "PNG")
    return buf.getvalue()
