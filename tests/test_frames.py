"""Near-duplicate images: fingerprints calibrated on real frames, clusters kept in one split, the leakage report.

The five real Kvasir-SEG frames and their copies (re-encoded, resized, cropped, brightened, rotated) are
made here; the distinct frames are the real ones and the sample's synthetic ones.
"""

from __future__ import annotations

import io
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageEnhance

from conftest import SAMPLE_DIR, SHARED
from dedup.frames import (NEAREST_PAIR_COLUMNS, WORDS, cluster_figures, connected_components, fingerprint_distance,
                          hamming, image_clusters, near_duplicate_pairs, nearest_cross_split_pairs,
                          nearest_distance_figures, table_plan)
from kvqa.config import DEFAULT_NEAR_DUPLICATE_DISTANCE, SplitConfig
from publish.card import _dedup_section
from publish.split import assign_splits, usable_images
from sources.images import check_image, frame_fingerprints

REAL_FRAMES = SHARED / "kvasir-seg" / "images"
R = DEFAULT_NEAR_DUPLICATE_DISTANCE


def _jpeg(im: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue()))


def copies_of(im: Image.Image) -> dict[str, Image.Image]:
    """The copies a near-duplicate search must match: re-encoded, resized, cropped 5-10 % (centred and
    from each corner), brightness +-20 %, rotated +-3-5 degrees."""
    w, h = im.size
    out = {f"jpeg q{q}": _jpeg(im, q) for q in (50, 75, 95)}
    out |= {f"resize {s}x": im.resize((round(w * s), round(h * s)), Image.Resampling.BICUBIC) for s in (0.5, 0.75, 1.5)}
    for f in (0.05, 0.10):
        dx, dy = round(w * f), round(h * f)
        out[f"crop {f:.0%} centre"] = im.crop((dx // 2, dy // 2, w - (dx - dx // 2), h - (dy - dy // 2)))
        out[f"crop {f:.0%} top-left"] = im.crop((dx, dy, w, h))
        out[f"crop {f:.0%} bottom-right"] = im.crop((0, 0, w - dx, h - dy))
        out[f"crop {f:.0%} top-right"] = im.crop((0, dy, w - dx, h))
    out["crop 3 % left, 7 % top"] = im.crop((round(0.03 * w), round(0.07 * h), w, h))
    out |= {f"brightness {b}": ImageEnhance.Brightness(im).enhance(b) for b in (0.8, 1.2)}
    out |= {f"rotate {a}": im.rotate(a, resample=Image.Resampling.BICUBIC) for a in (-5, -3, 3, 5)}
    out["half size, rotate 3, jpeg q60"] = _jpeg(im.resize((w // 2, h // 2), Image.Resampling.BICUBIC)
                                                 .rotate(3, resample=Image.Resampling.BICUBIC), 60)
    return out


def _fp(path: Path) -> tuple[str, str]:
    checked = check_image(path)  # the image stage's own fingerprint
    return checked["fingerprint"], checked["window_fingerprints"]


@pytest.fixture(scope="module")
def real() -> dict:
    """Fingerprints of the real frames (through `check_image`) and of their copies."""
    if not REAL_FRAMES.is_dir():
        pytest.skip(f"real Kvasir-SEG frames not found at {REAL_FRAMES} (../shared/data is absent)")
    paths = sorted(REAL_FRAMES.glob("*.jpg"))
    assert len(paths) == 5
    originals = {p.stem: _fp(p) for p in paths}
    copies = {}
    for p in paths:
        with Image.open(p) as im:
            for name, copy in copies_of(im.convert("RGB")).items():
                copies[(p.stem, name)] = frame_fingerprints(copy)
    return {"originals": originals, "copies": copies}


@pytest.fixture(scope="module")
def synthetic() -> dict[str, tuple[str, str]]:
    """The sample's synthetic frames (Kvasir-VQA-like and HyperKvasir-like): distinct pictures, many drawn
    by one generator with the same or different labels."""
    paths = sorted((SAMPLE_DIR / "images").glob("*.jpg")) + sorted((SAMPLE_DIR / "hyper-kvasir").rglob("*.jpg"))
    assert len(paths) > 60
    return {p.stem: _fp(p) for p in paths}


# --- calibration ---------------------------------------------------------------------------------------

def test_copies_of_real_frames_match_and_distinct_frames_do_not(real, synthetic):
    copy_d = {key: fingerprint_distance(fp, real["originals"][key[0]]) for key, fp in real["copies"].items()}
    # README's margins: the farthest copy 8 bits inside the threshold, the closest distinct pair 9 outside
    assert max(copy_d.values()) <= R - 8, sorted(copy_d.items(), key=lambda kv: -kv[1])[:5]
    distinct = list(real["originals"].values()) + list(synthetic.values())
    distinct_d = [fingerprint_distance(a, b) for a, b in combinations(distinct, 2)]
    assert min(distinct_d) >= R + 9
    real_d = [fingerprint_distance(a, b) for a, b in combinations(real["originals"].values(), 2)]
    assert min(real_d) >= 2 * R - 8  # distinct real frames are far apart (80 bits)
    # a copy of one real frame is not near any other real frame either
    cross = [fingerprint_distance(fp, other) for (stem, _), fp in real["copies"].items()
             for o, other in real["originals"].items() if o != stem]
    assert min(cross) > R


def _frame_table(real: dict, synthetic: dict, ids: dict) -> pd.DataFrame:
    """Originals, copies and synthetic frames as usable images: every copy under an id from `ids`."""
    rows = [{"source": "kvasir-seg", "img_id": stem, "source_label": "polyp", "sha256": f"o-{stem}",
             "fingerprint": fp[0], "window_fingerprints": fp[1], "frame": stem}
            for stem, fp in real["originals"].items()]
    rows += [{"source": "hyper-kvasir", "img_id": ids[key], "source_label": "polyp" if i % 3 else "cecum",
              "sha256": f"c-{ids[key]}", "fingerprint": fp[0], "window_fingerprints": fp[1], "frame": key[0]}
             for i, (key, fp) in enumerate(real["copies"].items())]
    rows += [{"source": "sample", "img_id": stem, "source_label": "polyp" if i % 2 else "normal",
              "sha256": f"s-{stem}", "fingerprint": fp[0], "window_fingerprints": fp[1], "frame": f"synthetic-{stem}"}
             for i, (stem, fp) in enumerate(synthetic.items())]
    return pd.DataFrame(rows)


@pytest.mark.parametrize("id_seed", [0, 1, 2])
def test_near_duplicate_frames_land_in_one_split_whatever_their_ids(real, synthetic, id_seed):
    rng = np.random.default_rng(id_seed)
    ids = {key: f"{rng.integers(0, 16**8):08x}-{n}" for n, key in enumerate(real["copies"])}
    frames = _frame_table(real, synthetic, ids)
    splits = assign_splits(frames.drop(columns="frame"), 0.3, seed=42 + id_seed)
    merged = splits.merge(frames[["source", "img_id", "frame"]], on=["source", "img_id"])
    assert len(merged) == len(frames)
    # every real frame with all its copies is one cluster in one split; no synthetic frame joins any
    per_frame = merged.groupby("frame").agg(splits=("split", "nunique"), clusters=("cluster", "nunique"),
                                            size=("img_id", "size"))
    assert (per_frame["splits"] == 1).all() and (per_frame["clusters"] == 1).all()
    assert merged.groupby("cluster")["frame"].nunique().max() == 1
    figures = cluster_figures(splits)
    assert figures["clusters"] == 5 and figures["largest_cluster"] == 1 + len(real["copies"]) // 5
    # stratification is kept as well as whole clusters allow: the synthetic strata hit their targets
    synth = merged[merged.source == "sample"]
    for _, g in synth.groupby("source_label"):
        assert (g.split == "test").sum() == round(0.3 * len(g))
    # the leakage report on the clustered split: every test image's nearest train image is beyond the radius,
    # and exactly that nearest one (brute force over the fingerprint distance)
    nearest = nearest_cross_split_pairs(frames, splits)
    first = nearest[nearest["rank"] == 1]
    assert len(first) == (splits.split == "test").sum() and (first.distance > R).all()
    fps = {(r.source, r.img_id): (r.fingerprint, r.window_fingerprints) for r in frames.itertuples()}
    train = [k for k, sp in zip(zip(splits.source, splits.img_id), splits.split) if sp == "train"]
    for r in first.itertuples():
        brute = min(fingerprint_distance(fps[(r.test_source, r.test_img_id)], fps[t]) for t in train)
        assert r.distance == brute == fingerprint_distance(fps[(r.test_source, r.test_img_id)],
                                                           fps[(r.train_source, r.train_img_id)])


def test_order_of_rows_does_not_change_clusters_or_splits(real, synthetic):
    ids = {key: f"copy-{n:03d}" for n, key in enumerate(real["copies"])}
    frames = _frame_table(real, synthetic, ids).drop(columns="frame")
    a = assign_splits(frames, 0.2, seed=7)
    b = assign_splits(frames.sample(frac=1, random_state=11), 0.2, seed=7)
    pd.testing.assert_frame_equal(a, b)
    clusters = image_clusters(frames.sample(frac=1, random_state=5))
    assert clusters.sort_index().tolist() == image_clusters(frames).tolist()


def test_leakage_report_finds_a_planted_cross_split_near_duplicate(real):
    """A copy of a real frame under an id that a split without clustering sends to the other split: the
    report names it; the clustered split has none."""
    stem, (fp, win) = next(iter(real["originals"].items()))
    copy_fp = real["copies"][(stem, "crop 10% top-left")]
    others = [(s, f) for s, f in real["originals"].items() if s != stem]
    base = [{"source": "kvasir-seg", "img_id": s, "source_label": "polyp", "sha256": f"o-{s}",
             "fingerprint": f[0], "window_fingerprints": f[1]} for s, f in [(stem, (fp, win)), *others]]
    for n in range(200):  # find an id that a split by image alone puts apart from the original
        copy = {"source": "kvasir-seg", "img_id": f"planted-{n}", "source_label": "polyp", "sha256": f"c-{n}",
                "fingerprint": copy_fp[0], "window_fingerprints": copy_fp[1]}
        images = pd.DataFrame([*base, copy])
        unclustered = assign_splits(images[["source", "img_id", "source_label", "sha256"]], 0.5, seed=3)
        by_id = dict(zip(unclustered.img_id, unclustered.split))
        if by_id[stem] != by_id[copy["img_id"]]:
            break
    else:
        pytest.fail("no id separates the copy from its original")
    pairs = nearest_cross_split_pairs(images, unclustered)
    assert list(pairs.columns) == NEAREST_PAIR_COLUMNS
    first = pairs[pairs["rank"] == 1]
    leak = first[first.distance <= R]
    assert len(leak) == 1
    leak = leak.iloc[0]
    assert {leak.train_img_id, leak.test_img_id} == {stem, copy["img_id"]}
    assert 0 < leak.distance <= R and not leak.same_bytes
    assert nearest_distance_figures(pairs, R, 64)["closest_cross_split_distance"] == leak.distance
    # equal bytes leak too, at distance 0, even without fingerprints
    same = images.assign(sha256=lambda d: np.where(d.img_id == copy["img_id"], f"o-{stem}", d.sha256))
    bytes_only = same.drop(columns=["fingerprint", "window_fingerprints"])
    pairs = nearest_cross_split_pairs(bytes_only, unclustered)
    assert len(pairs) == 1 and pairs.iloc[0].same_bytes and pairs.iloc[0].distance == 0
    clustered = assign_splits(images, 0.5, seed=3)
    first = nearest_cross_split_pairs(images, clustered).query("rank == 1")
    assert len(first) == (clustered.split == "test").sum() and (first.distance > R).all()
    assert cluster_figures(clustered) == {
        "clusters": 1, "images_in_clusters": 2, "largest_cluster": 2, "cluster_sizes": {"2": 1}}


def test_the_nearest_train_distance_moves_with_what_the_split_kept_apart():
    """The image-level figures are not fixed by the split: a test image drawn closer to a train image (still
    beyond the radius) lowers the closest distance and enters the leakage band; the ranks are the order of
    the distances, ties to the first train image."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2, 256, dtype=np.uint8)

    def hexcode(bits: np.ndarray) -> str:
        return np.packbits(bits).tobytes().hex()

    def flipped(n: int, seed: int) -> np.ndarray:
        out = base.copy()
        out[np.random.default_rng(seed).choice(256, n, replace=False)] ^= 1
        return out

    def table(test_flips: int) -> pd.DataFrame:
        codes = {"train-a": base, "train-b": flipped(90, 1), "train-c": flipped(90, 2), "test": flipped(test_flips, 3)}
        return pd.DataFrame([{"source": "s", "img_id": k, "sha256": k, "fingerprint": hexcode(v),
                              "window_fingerprints": hexcode(v) * 5} for k, v in codes.items()])

    splits = pd.DataFrame({"source": "s", "img_id": ["train-a", "train-b", "train-c", "test"],
                           "split": ["train", "train", "train", "test"]})
    far, near = (nearest_cross_split_pairs(table(n), splits) for n in (100, 50))
    assert near["train_img_id"].iloc[0] == "train-a" and list(near["rank"]) == [1, 2, 3]
    assert near.distance.is_monotonic_increasing and near.distance.iloc[0] == 50
    f_far, f_near = (nearest_distance_figures(p, R, 64) for p in (far, near))
    assert f_near["closest_cross_split_distance"] == 50 < f_far["closest_cross_split_distance"]
    assert (f_near["test_images_near_train"], f_far["test_images_near_train"]) == (1, 0)
    assert f_near["nearest_train_distance_histogram"] == {"48-55": 1}


# --- the search ----------------------------------------------------------------------------------------

def _flip(code: np.ndarray, n_bits: int, rng) -> np.ndarray:
    out = code.copy()
    for bit in rng.choice(64 * WORDS, n_bits, replace=False):
        out[bit // 64] ^= np.uint64(1) << np.uint64(bit % 64)
    return out


def _brute_force(whole: np.ndarray, windows: np.ndarray, max_distance: int) -> set[tuple[int, int]]:
    d = hamming(whole[:, None, :], whole[None, :, :])
    dw = hamming(whole[:, None, None, :], windows[None, :, :, :]).min(axis=2)  # whole of i vs windows of j
    dist = np.minimum(d, np.minimum(dw, dw.T))
    i, j = np.triu_indices(len(whole), 1)
    near = dist[i, j] <= max_distance
    return set(zip(i[near].tolist(), j[near].tolist()))


@pytest.mark.parametrize("max_distance", [0, 8, R, 56])
def test_multi_index_search_finds_exactly_the_pairs_brute_force_finds(max_distance):
    rng = np.random.default_rng(max_distance)
    n = 1500
    whole = rng.integers(0, 2**64, size=(n, WORDS), dtype=np.uint64)
    windows = rng.integers(0, 2**64, size=(n, 5, WORDS), dtype=np.uint64)
    # planted pairs at, just inside and just outside the radius, whole-to-whole and whole-to-window
    for i in range(0, 600, 3):
        d = int(np.clip(max_distance + rng.integers(-2, 3), 0, 255))
        if i % 2:
            whole[i + 1] = _flip(whole[i], d, rng)
        else:
            windows[i + 1, rng.integers(0, 5)] = _flip(whole[i], d, rng)
    whole[700] = whole[701] = whole[702]  # identical fingerprints
    pairs = near_duplicate_pairs(whole, windows, max_distance)
    expected = _brute_force(whole, windows, max_distance)
    assert set(zip(pairs.a.tolist(), pairs.b.tolist())) == expected
    assert len(expected) > 100
    plan = table_plan(256, max_distance, 6 * n)
    assert sum(f + 1 for _, _, f in plan) > max_distance  # pigeonhole: a pair within the radius is probed
    assert all(o + w <= 256 for o, w, _ in plan) and [o for o, _, _ in plan] == sorted({o for o, _, _ in plan})


def test_connected_components_join_chains_whatever_the_edge_order():
    edges = np.array([[5, 6], [0, 9], [6, 2], [9, 3], [7, 8]])
    for perm in ([0, 1, 2, 3, 4], [4, 3, 2, 1, 0], [2, 0, 4, 1, 3]):
        e = edges[perm]
        labels = connected_components(10, e[:, 0], e[:, 1])
        assert labels.tolist() == [0, 1, 2, 0, 4, 2, 2, 7, 7, 0]


# --- the image stage and the config ---------------------------------------------------------------------

def test_fingerprint_is_of_the_displayed_picture_and_every_mode_gets_one(tmp_path):
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 255, size=(60, 80, 3), dtype=np.uint8)).resize((400, 300))
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed turned 90 degrees clockwise
    base.save(tmp_path / "tagged.png", exif=exif)  # lossless; the reduction rounds differently when turned
    base.transpose(Image.Transpose.ROTATE_270).save(tmp_path / "turned.png")
    base.save(tmp_path / "plain.png")
    tagged, turned, plain = (_fp(tmp_path / f"{n}.png") for n in ("tagged", "turned", "plain"))
    assert fingerprint_distance(tagged, turned) <= 12 < R < fingerprint_distance(tagged, plain), (
        fingerprint_distance(tagged, turned), fingerprint_distance(tagged, plain))
    for mode in ("L", "LA", "RGBA", "P", "I;16", "1", "CMYK"):
        im = base.convert("RGBA" if mode == "LA" else mode) if mode != "I;16" else \
            Image.fromarray((np.asarray(base.convert("L"), dtype=np.uint16) * 257))
        name = tmp_path / f"m{mode.replace(';', '')}.{'jpg' if mode == 'CMYK' else 'png'}"
        (im.convert("LA") if mode == "LA" else im).save(name)
        fp, windows = _fp(name)
        assert len(fp) == 64 and len(windows) == 5 * 64
    gray8, gray16 = _fp(tmp_path / "mL.png"), _fp(tmp_path / "mI16.png")
    assert fingerprint_distance(gray8, gray16) <= 4  # 16-bit is scaled to 8, not clipped


def test_usable_images_carry_fingerprints_and_the_config_has_the_distance():
    images = pd.DataFrame([{"source": "s", "img_id": "a", "sha256": "x", "fingerprint": "0" * 64,
                            "window_fingerprints": "0" * 320, "path": "/p"}])
    qa = pd.DataFrame([{"source": "s", "img_id": "a", "source_label": "polyp"}] * 2)
    assert list(usable_images(qa, images).columns) == ["source", "img_id", "source_label", "sha256",
                                                        "fingerprint", "window_fingerprints"]
    assert SplitConfig().near_duplicate_distance == R
    with pytest.raises(ValueError, match="leakage_distance"):  # pairs within the radius share a split
        SplitConfig(near_duplicate_distance=50, leakage_distance=40)


def test_card_shows_the_image_level_figures():
    figures = {"model": "m", "threshold": 0.5, "rows_in": 10, "rows_kept": 9, "rows_removed": 1,
               "near_duplicate_distance": R, "leakage_distance": 64, "clusters": 3, "images_in_clusters": 8,
               "largest_cluster": 4, "cluster_sizes": {"2": 2, "4": 1}, "test_images_paired": 7,
               "closest_cross_split_distance": 53, "nearest_train_distance_histogram": {"48-55": 2, "56-63": 5},
               "test_images_near_train": 7, "test_rows_leaking": 2}
    text = "\n".join(_dedup_section(figures))
    assert "| distance of the closest test / train pair (bits) | 53 |" in text
    assert "| test images with a train image within 64 bits (similar scenes kept apart) | 7 |" in text
    assert "| test rows repeating a train row's meaning on a train image within 64 bits of theirs | 2 |" in text
    assert "| clusters of near-duplicate images (more than one image) | 3 |" in text
    assert "| images in those clusters | 8 |" in text and "| largest cluster (images) | 4 |" in text
    assert "| 4 | 1 |" in text and "| 56-63 | 5 |" in text  # cluster sizes, nearest distances
