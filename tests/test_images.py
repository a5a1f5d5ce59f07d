"""Hostile images at the image stage: a decompression bomb under Pillow's own limit (quarantined from its
header, memory bounded), EXIF orientation (one rule: the displayed orientation; boxes on a rotated file are
quarantined, masks are read as displayed), and the temporary files a killed run leaves."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pydantic
import pytest
from PIL import Image

from conftest import ROOT
from kvqa.config import DEFAULT_MAX_PIXELS, KvasirVQASource
from kvqa.tables import atomic_path, remove_orphan_temps
from sources.boxes import Box, read_mask_boxes
from sources.images import ImageError, check_image, inventory_images

BOMB_SIDE = 9_400  # 88.4 MP: under Pillow's 89.5 MP bomb limit, so Pillow alone lets it through


def single_colour_png(path: Path, width: int, height: int, rows_per_block: int = 100) -> Path:
    """A single-colour RGB PNG written without holding its pixels (278 kB for 9,400 x 9,400). Rows go through
    zlib one block at a time; after a full flush the compressor starts afresh, so every further block
    compresses to the same bytes and is repeated."""
    assert height % rows_per_block == 0

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    block = (b"\x00" + b"\x40\x80\xc0" * width) * rows_per_block  # filter byte 0, then the row's pixels
    comp = zlib.compressobj(9)
    first = comp.compress(block) + comp.flush(zlib.Z_FULL_FLUSH)
    again = comp.compress(block) + comp.flush(zlib.Z_FULL_FLUSH)
    adler = 1
    for _ in range(height // rows_per_block):
        adler = zlib.adler32(block, adler)
    idat = first + again * (height // rows_per_block - 1) + b"\x03\x00" + struct.pack(">I", adler)  # empty last block
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bomb")
    return single_colour_png(folder / "bomb.png", BOMB_SIDE, BOMB_SIDE)


def test_the_bomb_is_a_valid_png_under_pillows_limit(bomb):
    """The file is what the issue describes: small on disk, under Pillow's bomb limit, and it decodes to
    9,400 rows of 9,400 pixels (checked by inflating its data stream in bounded pieces, adler32 included)."""
    data = bomb.read_bytes()
    assert len(data) < 300_000
    with Image.open(bomb) as im:
        assert im.size == (BOMB_SIDE, BOMB_SIDE) and im.mode == "RGB"
    assert DEFAULT_MAX_PIXELS < BOMB_SIDE ** 2 < Image.MAX_IMAGE_PIXELS
    (idat_len,) = struct.unpack(">I", data[33:37])
    assert data[37:41] == b"IDAT"
    inflate, pending = zlib.decompressobj(), data[41:41 + idat_len]
    first_row = inflate.decompress(pending, 1 + 3 * BOMB_SIDE)
    assert first_row == b"\x00" + b"\x40\x80\xc0" * BOMB_SIDE
    pending, size = inflate.unconsumed_tail, len(first_row)
    while pending:
        size += len(inflate.decompress(pending, 1 << 24))
        pending = inflate.unconsumed_tail
    assert inflate.eof and size == BOMB_SIDE * (1 + 3 * BOMB_SIDE)


MEASURE = """
import json, resource, sys
import pandas as pd
from augment.render import AugmentImageError, decode_image
from kvqa.config import KvasirVQASource
from sources.images import inventory_images

folder = sys.argv[1]
src = KvasirVQASource(metadata_csv=folder + "/none.csv", image_dir=folder, image_extensions=(".png",))
wanted = pd.DataFrame({"source": ["kvasir-vqa"] * 2, "img_id": ["bomb", "small"]})
data = open(folder + "/bomb.png", "rb").read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
images, bad = inventory_images(wanted, [src])
try:
    decode_image(data, "bomb.png")
    augment = "decoded"
except AugmentImageError as err:
    augment = err.reason
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({"kept": list(images.img_id), "bad": dict(zip(bad.key, bad.reason)), "detail": list(bad.detail),
                  "augment": augment, "grown_kib": grown}))
"""


def test_an_image_over_max_pixels_is_quarantined_from_its_header_in_bounded_memory(bomb):
    """Inventory and augmentation both refuse the 9,400 x 9,400 PNG before decoding it (decoded it is
    265 MB); measured as the peak RSS growth of a fresh process around the two calls."""
    Image.new("RGB", (64, 48), (10, 20, 30)).save(bomb.parent / "small.png")
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(bomb.parent)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["kept"] == ["small"] and out["bad"] == {"bomb": "too_large"} and out["augment"] == "too_large"
    assert "9400x9400 (88,360,000 pixels), over max_pixels 16,777,216" in out["detail"][0]
    assert out["grown_kib"] < 64 * 1024, out  # 265 MB if it had been decoded


def test_max_pixels_is_a_bound_per_source(tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGB", (64, 48)).save(path)
    assert check_image(path, max_pixels=64 * 48)["width"] == 64
    with pytest.raises(ImageError) as err:
        check_image(path, max_pixels=64 * 48 - 1)
    assert err.value.reason == "too_large"
    src = KvasirVQASource(metadata_csv=tmp_path / "m.csv", image_dir=tmp_path, max_pixels=100)
    _, bad = inventory_images(pd.DataFrame({"source": ["kvasir-vqa"], "img_id": ["a"]}), [src])
    assert list(bad.reason) == ["too_large"]
    with pytest.raises(pydantic.ValidationError):  # Pillow refuses anything larger on its own
        KvasirVQASource(metadata_csv=tmp_path / "m.csv", image_dir=tmp_path, max_pixels=Image.MAX_IMAGE_PIXELS + 1)


def rotated_jpeg(path: Path, orientation: int = 6, size: tuple[int, int] = (400, 320)) -> Path:
    """A JPEG stored `size` (top half red, bottom half blue) with an EXIF orientation tag."""
    pixels = np.zeros((size[1], size[0], 3), np.uint8)
    pixels[: size[1] // 2] = (220, 30, 30)
    pixels[size[1] // 2:] = (30, 30, 220)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, "JPEG", quality=95, exif=exif.tobytes())
    return path


def test_sizes_are_as_displayed_and_boxes_on_a_rotated_file_are_quarantined(tmp_path):
    """`datasets` shows an orientation-6 file stored 400x320 as 320x400: the inventory records that size.
    An image with boxes and such a tag is quarantined (its boxes' orientation is unknown); without boxes
    it is kept; an unrotated image with boxes is kept."""
    import datasets

    rotated_jpeg(tmp_path / "rot.jpg")
    rotated_jpeg(tmp_path / "rotbox.jpg")
    rotated_jpeg(tmp_path / "plain.jpg", orientation=1)
    shown = datasets.Image().decode_example({"path": None, "bytes": (tmp_path / "rot.jpg").read_bytes()})
    assert shown.size == (320, 400)
    box = [{"label": "polyp", "xmin": 10, "ymin": 10, "xmax": 50, "ymax": 60}]
    facts = pd.DataFrame({"source": "kvasir-vqa", "img_id": ["rot", "rotbox", "rotbox", "plain"],
                          "boxes": [[], [], box, box]})
    src = KvasirVQASource(metadata_csv=tmp_path / "m.csv", image_dir=tmp_path)
    images, bad = inventory_images(facts, [src])
    assert dict(zip(bad.key, bad.reason)) == {"rotbox": "rotated_image_with_boxes"}
    assert "EXIF orientation 6 (displayed 320x400)" in bad.detail.iloc[0]
    sizes = {r.img_id: (r.width, r.height) for r in images.itertuples()}
    assert sizes == {"rot": shown.size, "plain": (400, 320)}


def test_a_mask_is_read_in_its_displayed_orientation(tmp_path):
    """A mask stored 40x30 with orientation 6 is shown 30x40 (turned 90 degrees clockwise): its object at
    stored x 0-9, y 0-4 is shown at x 25-29, y 0-9, so the box (one pixel outside) is 24,0-30,10."""
    masks = tmp_path / "masks"
    masks.mkdir()
    mask = np.zeros((30, 40), np.uint8)
    mask[0:5, 0:10] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(mask).save(masks / "m.png", exif=exif.tobytes())
    images, units = read_mask_boxes(masks, "polyp", 1, lambda *a: pytest.fail(f"rejected {a}"))
    assert units == 1 and (images[0].width, images[0].height) == (30, 40)
    assert images[0].boxes == [Box("polyp", 24, 0, 30, 10)]


def test_remove_orphan_temps_removes_what_atomic_path_leaves_and_nothing_else(tmp_path):
    run = tmp_path / "run"
    with atomic_path(run / "release" / "data" / "train-00000-of-00001.parquet") as tmp:
        tmp.write_bytes(b"x")
        left = tmp.name  # the name a SIGKILL before the rename would leave behind
    orphan = run / "release" / "data" / left
    orphan.write_bytes(b"torn")
    keep = [run / "release" / "data" / "train-00000-of-00001.parquet", run / "notes.tmp", run / ".gitkeep",
            run / "augmented" / ".x.jpg.tmp", run / "augmented" / "a.jpg"]
    for p in keep[1:]:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"k")
    assert remove_orphan_temps(run) == [orphan]
    assert not orphan.exists() and all(p.exists() for p in keep)
    assert remove_orphan_temps(tmp_path / "absent") == []


def test_inventory_is_the_same_however_its_checks_are_chunked_and_ordered(tmp_path):
    """The inventory's costly checks are mapped over chunks (on Dask, by workers finishing in any order):
    the tables are the same rows in (source, img_id) order, quarantine included, for any chunking."""
    for i in range(7):
        Image.new("RGB", (64, 48), (10 * i, 20, 30)).save(tmp_path / f"img{i}.png")
    (tmp_path / "img3.png").write_bytes(b"not a png")  # unreadable: quarantined by the check
    wanted = pd.DataFrame({"source": "kvasir-vqa", "img_id": [f"img{i}" for i in (6, 5, 4, 3, 2, 1, 0)]
                           + ["gone", "../up"]})  # missing and bad ids: quarantined before any check
    src = KvasirVQASource(metadata_csv=tmp_path / "m.csv", image_dir=tmp_path, image_extensions=(".png",))
    one_by_one, bad_one = inventory_images(wanted, [src], chunks=1)

    def backwards(fn, chunks):  # every chunk on its own, the last first
        return [fn(c) for c in reversed(chunks)]

    for chunks in (2, 3, 9):
        images, bad = inventory_images(wanted, [src], chunks=chunks, map_chunks=backwards)
        pd.testing.assert_frame_equal(images, one_by_one)
        pd.testing.assert_frame_equal(bad, bad_one)
    assert list(one_by_one.img_id) == ["img0", "img1", "img2", "img4", "img5", "img6"]
    assert list(bad_one.key) == ["../up", "gone", "img3"]
    assert list(bad_one.reason) == ["bad_id", "missing_image", "unreadable_image"]
