"""The augmented track on real Kvasir-SEG frames and on the sample: catalog validation, determinism in any
process order, replay from the record, independent per-step seeds, weak-but-real artifacts, odd and bad
inputs, resume, and the `augmented` release config."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from augment import (CatalogError, RenderSettings, augment_images, decode_image, frame_plan, load_artifact_catalog,
                     replay_variant, run_in_processes)
from augment.catalog import DEFAULT_ARTIFACTS_PATH, ArtifactCatalog, StepSpec
from augment.render import apply_steps, plan_recipe
from augment.track import render_chunk
from conftest import ROOT, SAMPLE_DIR, SHARED, tree_digests
from kvqa.tables import file_digest, read_table, write_table

REAL_FRAMES = SHARED / "kvasir-seg" / "images"


@pytest.fixture(scope="module")
def real_frames() -> pd.DataFrame:
    if not REAL_FRAMES.is_dir():
        pytest.skip(f"real Kvasir-SEG frames not found at {REAL_FRAMES} (../shared/data is absent)")
    paths = sorted(REAL_FRAMES.glob("*.jpg"))
    return pd.DataFrame({"source": "kvasir-seg", "img_id": [p.stem for p in paths], "path": [str(p) for p in paths]})


def sample_frames(n: int) -> pd.DataFrame:
    paths = sorted((SAMPLE_DIR / "images").glob("*.jpg"))[:n]
    return pd.DataFrame({"source": "kvasir-vqa", "img_id": [p.stem for p in paths], "path": [str(p) for p in paths]})


def _catalog_file(tmp_path: Path, edit) -> Path:
    import yaml

    data = yaml.safe_load(DEFAULT_ARTIFACTS_PATH.read_text())
    edit(data)
    path = tmp_path / "artifacts.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_default_catalog_has_ten_named_artifacts_on_the_authors_base():
    catalog = load_artifact_catalog()
    assert len(catalog.artifacts) == 10 and len({a.name for a in catalog.artifacts}) == 10
    assert [s.transform for s in catalog.base] == ["RandomResizedCrop", "Affine", "ColorJitter"]
    crop = catalog.base[0].init_args(576, 720)
    assert crop["size"] == [576, 720] and crop["ratio"] == pytest.approx([0.95 * 1.25, 1.05 * 1.25])


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["artifacts"][0].update(transform="MotionBlurr"), "unknown transform 'MotionBlurr'"),
    (lambda d: d["artifacts"][1]["params"].update(radius="big"), "bad parameters for Defocus"),
    (lambda d: d["artifacts"][0]["params"].update(blurr_limit=3), "'blurr_limit' are not valid"),
    (lambda d: d["artifacts"][0]["params"].update(blur_limit=[3, 8]), "must be odd"),  # would be "adjusted"
    (lambda d: d["base"][0]["params"].update(interpolation="bicubicc"), "unknown interpolation"),
    (lambda d: d["artifacts"].append(dict(d["artifacts"][0])), "repeated: ['motion_blur']"),
])
def test_bad_catalog_fails_naming_the_step(tmp_path, edit, message):
    with pytest.raises(CatalogError) as err:
        load_artifact_catalog(_catalog_file(tmp_path, edit))
    assert message in str(err.value)


def _augment(frames: pd.DataFrame, settings: RenderSettings, **kw):
    """`augment_images` with the table it wrote read back: (records, quarantine, figures, rendered)."""
    table = settings.run_dir / "stages" / "augmentations.parquet"
    quarantine, figures, rendered = augment_images(frame_plan(frames), settings, table, **kw)
    return read_table(table), quarantine, figures, rendered


def _render(frames: pd.DataFrame, run_dir: Path, **kw):
    return _augment(frames, RenderSettings(load_artifact_catalog(), 42, 95, run_dir), **kw)


def test_same_bytes_twice_in_any_process_order(real_frames, tmp_path, monkeypatch):
    monkeypatch.setattr("augment.track.ROW_GROUP_ROWS", 7)  # row groups cut across the batches, both runs
    frames = pd.concat([real_frames, sample_frames(3)], ignore_index=True)
    a, qa, figures, rendered = _render(frames, tmp_path / "a", batch_size=3, run_chunks=run_in_processes(2))
    assert rendered == len(a) == 10 * len(frames) and len(qa) == 0 and figures["augmented_images"] == len(frames)

    def one_by_one_reversed(chunks, settings):  # another order, another chunking, in this process
        return [render_chunk(c, settings) for c in reversed(chunks)][::-1]

    b, *_ = _render(frames.iloc[::-1], tmp_path / "b", batch_size=1, run_chunks=one_by_one_reversed)
    pd.testing.assert_frame_equal(a, b)
    table = "stages/augmentations.parquet"  # streamed from the records batches: same bytes however cut
    assert file_digest(tmp_path / "a" / table) == file_digest(tmp_path / "b" / table)
    assert {k: v for k, v in tree_digests(tmp_path / "a").items() if k.startswith("augmented/")} == \
           {k: v for k, v in tree_digests(tmp_path / "b").items() if k.startswith("augmented/")}
    # Same size and mode as the input; every variant differs from the others and from the input.
    for rec in a.itertuples():
        with Image.open(tmp_path / "a" / rec.output_path) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            assert im.size == Image.open(frames.set_index("img_id").loc[rec.img_id, "path"]).size
    assert a["output_sha256"].nunique() == len(a)


def test_every_variant_replays_from_its_record_alone(real_frames, tmp_path):
    records, *_ = _render(real_frames, tmp_path, batch_size=2, run_chunks=run_in_processes(2))
    paths = dict(zip(real_frames["img_id"], real_frames["path"]))
    for rec in records.itertuples():
        replayed = replay_variant(rec.recipe, Path(paths[rec.img_id]))
        assert replayed == (tmp_path / rec.output_path).read_bytes(), rec.output_path
        recipe = json.loads(rec.recipe)
        assert recipe["versions"]["albumentations"] == "2.0.8"
        assert [s["name"] for s in recipe["steps"]][-1] == rec.artifact
        json.dumps(recipe, allow_nan=False)  # JSON-safe: no arrays, no NaN


def test_each_step_has_its_own_seed_and_fires_at_its_probability():
    """The albumentations 2.0.8 trap: `Compose(seed=k)` gives every child the same generator state, so
    children at p=0.5 fire together. Here each step is seeded on its own: over many images each fires
    about half the time, independently of the others, and its parameters spread over their range."""
    import albumentations as A

    half = [StepSpec(name=n, transform=t, params=p, p=0.5) for n, t, p in [
        ("rotate", "Affine", {"rotate": [-10, 10]}),
        ("jitter", "ColorJitter", {"brightness": 0.2, "contrast": 0.0, "saturation": 0.0, "hue": 0.0}),
        ("gamma", "RandomGamma", {"gamma_limit": [80, 120]})]]
    catalog = ArtifactCatalog(version=1, base=half[:2], artifacts=[half[2]])
    pixels = np.full((24, 32, 3), 128, np.uint8)
    n = 600
    fired = np.zeros((n, 3), bool)
    angles, gammas = [], []
    for i in range(n):
        _, applied, _ = apply_steps(pixels, plan_recipe(catalog, 42, "s", f"img{i}", 0, 24, 32), {})
        fired[i] = [s["fired"] for s in applied]
        if applied[0]["fired"]:
            angles.append(applied[0]["params"]["rotate"])
        if applied[2]["fired"]:
            gammas.append(applied[2]["params"]["gamma"])
    rate = fired.mean(axis=0)
    assert np.all(np.abs(rate - 0.5) < 0.07), rate  # ~5 sigma for n=600
    for a, b in [(0, 1), (0, 2), (1, 2)]:
        agree = (fired[:, a] == fired[:, b]).mean()
        assert abs(agree - 0.5) < 0.07, (a, b, agree)  # independent, not always together
    assert min(angles) < -9 and max(angles) > 9 and abs(np.mean(angles)) < 1.5
    assert min(gammas) < 0.82 and max(gammas) > 1.18
    # The same children in one Compose re-seeded per image: they fire together (the trap this avoids).
    together = 0
    for i in range(200):
        comp = A.Compose([A.Affine(rotate=(-10, 10), p=0.5), A.RandomGamma(p=0.5)], seed=i, save_applied_params=True)
        names = [t for t, _ in comp(image=pixels)["applied_transforms"]]
        together += len(names) != 1
    assert together == 200


def test_each_artifact_changes_the_image_weakly(real_frames):
    """PSNR of each artifact's variant to the base-only variant (same seeds, artifact left out)."""
    catalog = load_artifact_catalog()
    psnr = {}
    for row in pd.concat([real_frames, sample_frames(10)]).itertuples():
        decoded = decode_image(Path(row.path).read_bytes(), row.img_id)
        h, w = decoded.pixels.shape[:2]
        for variant, artifact in enumerate(catalog.artifacts):
            steps = plan_recipe(catalog, 42, row.source, row.img_id, variant, h, w)
            full, _, _ = apply_steps(decoded.pixels, steps, {})
            base, _, _ = apply_steps(decoded.pixels, steps[:-1], {})
            mse = np.mean((full.astype(float) - base.astype(float)) ** 2)
            assert mse > 0, f"{artifact.name} left {row.img_id} unchanged"
            psnr.setdefault(artifact.name, []).append(10 * np.log10(255 ** 2 / mse))
    for name, values in psnr.items():  # weak: never below 25 dB; real: a typical variant below 45 dB
        assert min(values) >= 25 and np.median(values) <= 45, (name, values)


def _png(mode: str, size=(64, 48)) -> bytes:
    rng = np.random.default_rng(0)
    if mode == "I;16":
        im = Image.fromarray(rng.integers(0, 65535, size[::-1], dtype=np.uint16))
    elif mode == "P":
        im = Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).quantize(16)
    else:
        im = Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    im.save(buf, "JPEG" if mode == "CMYK" else "PNG")
    return buf.getvalue()


def test_odd_modes_are_converted_and_broken_files_quarantined(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for mode in ("L", "I;16", "RGBA", "P", "CMYK", "LA"):
        (folder / f"{mode.replace(';', '')}.img").write_bytes(_png(mode))
    real = sorted((SAMPLE_DIR / "images").glob("*.jpg"))[0].read_bytes()
    (folder / "truncated.img").write_bytes(real[: len(real) // 3])
    (folder / "garbage.img").write_bytes(b"not an image at all")
    paths = sorted(folder.glob("*.img"))
    frames = pd.DataFrame({"source": "x", "img_id": [p.stem for p in paths], "path": [str(p) for p in paths]})
    records, quarantine, figures, _ = _render(frames, tmp_path / "run", batch_size=2, run_chunks=run_in_processes(1))
    assert dict(zip(quarantine["key"], quarantine["reason"])) == {"truncated": "corrupt_image",
                                                                   "garbage": "corrupt_image"}
    assert figures["augmented_images"] + len(quarantine) == len(frames) == 8
    modes = records.drop_duplicates("img_id").set_index("img_id")["mode"].to_dict()
    assert modes == {"L": "L", "I16": "L", "LA": "L", "RGBA": "RGB", "P": "RGB", "CMYK": "RGB"}
    for rec in records.itertuples():
        with Image.open(tmp_path / "run" / rec.output_path) as im:
            assert (im.size, im.mode, im.format) == ((64, 48), rec.mode, "JPEG")
    # 16-bit input is scaled to 8 bits, not clipped to white.
    assert 60 < decode_image(_png("I;16"), "x").pixels.mean() < 200


def test_resume_skips_intact_variants_and_redoes_damaged_ones(real_frames, tmp_path):
    run = tmp_path / "run"
    first, *_ = _render(real_frames, run, batch_size=2, run_chunks=run_in_processes(2))
    reference = tree_digests(run)
    victims = first.iloc[[3, 17]]
    (run / victims.iloc[0].output_path).unlink()                    # a variant that never got written
    (run / victims.iloc[1].output_path).write_bytes(b"\xff\xd8 torn")  # a torn file from a killed worker
    again, _, _, rendered = _render(real_frames, run, batch_size=2, run_chunks=run_in_processes(2))
    assert rendered == 2
    pd.testing.assert_frame_equal(first, again)
    assert tree_digests(run) == reference
    # Records of a batch lost with a kill: its images' variants are rendered again, to the same bytes.
    for f in sorted((run / "augment" / "records").glob("*.parquet"))[:1]:
        f.unlink()
    again, _, _, rendered = _render(real_frames, run, batch_size=2, run_chunks=run_in_processes(1))
    assert rendered in (10, 20) and tree_digests(run) == reference
    # A new seed re-renders everything and leaves no file of the old track behind.
    settings = RenderSettings(load_artifact_catalog(), 7, 95, run)
    other, _, _, rendered = _augment(real_frames, settings, batch_size=2, run_chunks=run_in_processes(2))
    assert rendered == len(other) and set(other["output_sha256"]).isdisjoint(first["output_sha256"])
    assert {str(p.relative_to(run)) for p in (run / "augmented").rglob("*.jpg")} == set(other["output_path"])


def test_a_chunk_killed_half_way_keeps_its_finished_batches(tmp_path):
    """A task chunk holds many records batches (its size follows the workers, not the images): each batch
    is persisted as it finishes, so a chunk that dies half way loses only the batch it was rendering."""
    frames = sample_frames(6)
    run = tmp_path / "run"
    settings = RenderSettings(load_artifact_catalog(), 42, 95, run)

    def dies_in_its_last_batch(chunks, settings):
        (chunk,) = chunks  # 6 images, batches of 2, one task chunk
        assert [len(b) for b in chunk] == [2, 2, 2]
        chunk[-1][-1] = {k: v for k, v in chunk[-1][-1].items() if k != "path"}  # fails as a killed worker
        return [render_chunk(chunk, settings)]

    with pytest.raises(KeyError):
        _augment(frames, settings, batch_size=2, tasks=1, run_chunks=dies_in_its_last_batch)
    assert len(list((run / "augment/records").glob("batch-*.parquet"))) == 2
    records, _, _, rendered = _augment(frames, settings, batch_size=2, tasks=3, run_chunks=render_here)
    assert rendered == 2 * 10 and len(records) == 60  # only the last batch is rendered again


FLOW_SIDE = """
import sys
from pathlib import Path

import pandas as pd

import augment.track
from augment import RenderSettings, augment_images, frame_plan, load_artifact_catalog
from augment.track import ChunkResult, chunk_images
from kvqa.tables import quarantine_frame


def kb(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field))


def recorded_already(chunks, settings):  # every batch's records are on disk: nothing to render
    return [ChunkResult(quarantine_frame([]), chunk_images(c), 0) for c in chunks]


def stage_of(run):
    frames = pd.read_parquet(run / "frames.parquet")
    settings = RenderSettings(load_artifact_catalog(), 42, 95, run)
    quarantine, figures, _ = augment_images(frame_plan(frames), settings, run / "table.parquet", batch_size=8,
                                            run_chunks=recorded_already)
    assert figures["variants"] == 10 * len(frames), figures


augment.track.ROW_GROUP_ROWS = 1024
stage_of(Path(sys.argv[1]))  # a small run first: what the code needs once (lazy imports, buffers) is paid
open("/proc/self/clear_refs", "w").write("5")  # peak RSS from here on
before = kb("VmRSS")
stage_of(Path(sys.argv[2]))
print(kb("VmHWM") - before)
"""


def test_the_flow_side_never_holds_the_records_of_the_track(tmp_path):
    """At 1.1M variants the records are ~2 GB: the flow's process plans from an index of which file holds
    which image, and streams the table from the batch files, so its memory does not grow with them."""
    import os
    import subprocess
    import sys

    from augment.track import batch_file, plan_batches, records_frame

    def recorded_run(run: Path, n: int) -> None:  # n images whose variants are all on record
        frames = pd.DataFrame({"source": "x", "img_id": [f"i{k:05d}" for k in range(n)], "path": "/absent.jpg"})
        run.mkdir()
        frames.to_parquet(run / "frames.parquet")
        settings = RenderSettings(load_artifact_catalog(), 42, 95, run)
        for batch in plan_batches(frame_plan(frames), run, 8):
            records = [{"source": "x", "img_id": im["img_id"], "variant": v, "artifact": a.name,
                        "input_sha256": "0" * 64, "output_path": f"augmented/x/{im['img_id']}/{v:02d}.jpg",
                        "output_sha256": "0" * 64, "width": 9, "height": 9, "mode": "RGB", "n_bytes": 1,
                        "recipe": os.urandom(1000).hex()}
                       for im in batch for v, a in enumerate(settings.catalog.artifacts)]
            write_table(records_frame(records), run / batch_file(batch, settings))

    n = 4_000
    recorded_run(tmp_path / "small", 16)
    recorded_run(tmp_path / "big", n)
    payload_kb = n * 10 * 2000 // 1024  # the recipes alone: ~78 MB
    proc = subprocess.run([sys.executable, "-c", FLOW_SIDE, str(tmp_path / "small"), str(tmp_path / "big")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "ARROW_DEFAULT_MEMORY_POOL": "system"})
    assert proc.returncode == 0, proc.stderr
    # Measured: ≈ 34 MB here, most of it the allocator's per-thread arenas of the parquet reader; the plan
    # step that loaded every record took 223 MB (2.9x the recipes) before anything was rendered.
    grew_kb = int(proc.stdout.split()[-1])
    assert grew_kb < payload_kb * 3 / 4, f"peak RSS grew {grew_kb} kB for {payload_kb} kB of records"
    assert read_table(tmp_path / "big" / "table.parquet")["img_id"].is_monotonic_increasing


def test_release_has_an_augmented_config_and_swift_exports(sample_run, tmp_path):
    import datasets

    report = json.loads((sample_run / "report.json").read_text())
    assert (sample_run / report["augment"]["contact_sheet"]).is_file()
    with Image.open(sample_run / report["augment"]["contact_sheet"]) as sheet:
        assert sheet.format == "PNG" and sheet.width > 10 * 160
    base = datasets.load_dataset(str(sample_run / "release"), cache_dir=str(tmp_path / "c1"))
    aug = datasets.load_dataset(str(sample_run / "release"), "augmented", cache_dir=str(tmp_path / "c2"))
    assert set(aug) == {"train", "test"}
    left_out = sum(report["release"]["augmented_left_out"].values())  # pairs whose box answer changed
    assert sum(len(aug[s]) for s in aug) + left_out == 10 * sum(len(base[s]) for s in base)
    for split in ("train", "test"):
        df = aug[split].remove_columns("image").to_pandas()
        assert set(df["qa_id"]) == set(base[split]["qa_id"])
    row = aug["test"][0]
    records = pd.read_parquet(sample_run / "stages" / "augmentations.parquet").set_index(["img_id", "variant"])
    rec = records.loc[(row["img_id"], row["variant"])]
    assert row["artifact"] == rec["artifact"]
    assert np.array_equal(np.asarray(row["image"]), np.asarray(Image.open(sample_run / rec["output_path"])))
    # ms-swift JSONL for both tracks, one line per pair, images that exist.
    for track, rows in (("original", base), ("augmented", aug)):
        for split in ("train", "test"):
            lines = (sample_run / "export" / "swift" / f"{track}-{split}.jsonl").read_text().splitlines()
            assert len(lines) == len(rows[split])
            first = json.loads(lines[0])
            assert [m["role"] for m in first["messages"]] == ["user", "assistant"]
            assert first["messages"][0]["content"].startswith("<image>") and Path(first["images"][0]).is_file()
    card = (sample_run / "release" / "README.md").read_text()
    assert "config_name: augmented" in card and "## Augmented track" in card


def test_augment_track_flow_runs_alone(tmp_path):
    from conftest import copy_sample, run_cli, write_config

    csv_path, images = copy_sample(tmp_path / "sample")
    for p in sorted(images.glob("*.jpg"))[6:]:
        p.unlink()
    cfg = write_config(tmp_path / "a.yaml", csv_path, images, run_name="alone",
                       augment={"workers": 2, "batch_size": 2})
    proc = run_cli("augment", "--config", str(cfg))
    run = tmp_path / "runs" / "alone"
    records = pd.read_parquet(run / "stages" / "augmentations.parquet")
    assert len(records) == 60 and "60 variants of 6 images" in proc.stdout
    assert (run / "augment" / "contact-sheet.png").is_file()


def render_here(chunks, settings):
    """The chunk runner without processes: fast for a handful of images."""
    return [render_chunk(c, settings) for c in chunks]


def test_variants_have_the_orientation_datasets_shows(tmp_path):
    """A JPEG stored 400x320 with EXIF orientation 6 is shown 320x400 by `datasets` (the release embeds the
    file as is): every variant is 320x400 too, with the picture turned the same way (the stored top half,
    red, is on the right), and replays from its record."""
    import datasets

    from test_images import rotated_jpeg

    path = rotated_jpeg(tmp_path / "rot.jpg")
    shown = datasets.Image().decode_example({"path": None, "bytes": path.read_bytes()})
    assert shown.size == (320, 400)
    frames = pd.DataFrame({"source": "x", "img_id": ["rot"], "path": [str(path)]})
    records, quarantine, *_ = _render(frames, tmp_path / "run", run_chunks=render_here)
    assert len(records) == 10 and len(quarantine) == 0
    for rec in records.itertuples():
        assert (rec.width, rec.height) == shown.size and json.loads(rec.recipe)["exif_orientation"] == 6
        with Image.open(tmp_path / "run" / rec.output_path) as im:
            assert im.size == shown.size
            pixels = np.asarray(im.convert("RGB"), float)
        left, right = pixels[:, :100].mean(axis=(0, 1)), pixels[:, -100:].mean(axis=(0, 1))
        assert left[2] > left[0] + 60 and right[0] > right[2] + 60, (rec.artifact, left, right)
        assert replay_variant(rec.recipe, path) == (tmp_path / "run" / rec.output_path).read_bytes()


def test_an_input_over_max_pixels_is_quarantined_undecoded(tmp_path):
    frames = sample_frames(2)
    settings = RenderSettings(load_artifact_catalog(), 42, 95, tmp_path, max_pixels=400 * 320 - 1)
    records, quarantine, figures, _ = _augment(frames, settings, run_chunks=render_here)
    assert len(records) == 0 and set(quarantine["reason"]) == {"too_large"} and len(quarantine) == 2
    assert "400x320 (128,000 pixels), over max_pixels 127,999" in quarantine["detail"].iloc[0]


def test_temporary_files_of_a_killed_run_are_removed(tmp_path):
    """`atomic_path` temporaries a SIGKILL left in `augmented/` and `augment/records/` go when the stage
    starts again (the run folder has one writer); other files are not touched."""
    left = [tmp_path / "augmented" / "x" / "a" / ".00-motion_blur.jpg.k3j_9x2a.tmp",
            tmp_path / "augment" / "records" / ".batch-0123.parquet.ab12cd34.tmp"]
    kept = tmp_path / "augment" / "notes.tmp"
    for p in (*left, kept):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"torn")
    settings = RenderSettings(load_artifact_catalog(), 42, 95, tmp_path)
    _augment(sample_frames(0), settings, run_chunks=render_here)
    assert not any(p.exists() for p in left) and kept.exists()


def test_a_masks_source_with_augmentation_does_not_hang(tmp_path):
    """Kvasir-SEG masks are read with OpenCV in the flow's process (its thread pool starts), then the
    augment pool starts: forked workers used to block forever in `cv2.setNumThreads` (2 of 2 runs killed
    at 300 s). The real CLI with a timeout; the 5 real frames and masks."""
    import yaml

    from conftest import run_cli

    if not REAL_FRAMES.is_dir():
        pytest.skip(f"real Kvasir-SEG frames not found at {REAL_FRAMES} (../shared/data is absent)")
    config = {"run_name": "seg", "output_root": str(tmp_path / "runs"),
              "sources": [{"kind": "boxes", "name": "kvasir-seg", "masks_dir": str(REAL_FRAMES.parent / "masks"),
                           "box_labels": ["polyp"], "image_label": "polyp", "image_dir": str(REAL_FRAMES)}],
              "augment": {"workers": 2, "batch_size": 2}}
    (tmp_path / "seg.yaml").write_text(yaml.safe_dump(config))
    proc = run_cli("augment", "--config", str(tmp_path / "seg.yaml"), timeout=240)
    records = pd.read_parquet(tmp_path / "runs" / "seg" / "stages" / "augmentations.parquet")
    assert len(records) == 50 and records["img_id"].nunique() == 5, proc.stdout


OWNER = """
import os, sys, time
from pathlib import Path

from augment.track import run_in_processes


def mark_and_sleep(path):
    Path(path).write_text(str(os.getpid()))
    time.sleep(300)


if __name__ == "__main__":
    marks = sys.argv[1]
    run_in_processes(2, lambda pool, chunks, settings: [pool.submit(mark_and_sleep, f"{marks}/{i}")
                                                       for i in range(len(chunks))])([[{}], [{}]], None)
"""


def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        out.setdefault(ppid, []).append(int(stat.parent.name))
    return out


def _descendants(pid: int) -> set[int]:
    children, found, todo = _children(), set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads the process tree from /proc")
def test_pool_workers_die_with_their_parent(tmp_path):
    """SIGKILL the process that owns an augment pool while its workers are busy: every process it started
    (workers, fork server) is gone within seconds instead of rendering on into the run folder."""
    import os
    import signal
    import subprocess
    import sys
    import time

    (tmp_path / "owner.py").write_text(OWNER)
    marks = tmp_path / "marks"
    marks.mkdir()
    owner = subprocess.Popen([sys.executable, str(tmp_path / "owner.py"), str(marks)], cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while len(list(marks.iterdir())) < 2:
            assert owner.poll() is None and time.monotonic() < deadline, "the workers did not start"
            time.sleep(0.2)
        workers = {int(p.read_text()) for p in marks.iterdir()}
        started = _descendants(owner.pid)
        assert workers <= started and all(map(_running, workers))
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait()
        deadline = time.monotonic() + 15
        while any(map(_running, started)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for p in started if _running(p)], "processes outlived the pool's owner"
    finally:
        try:
            os.killpg(owner.pid, signal.SIGKILL)  # the owner's process group, should the test fail
        except ProcessLookupError:
            pass


def _white_box_frame(h: int, w: int, box: tuple[int, int, int, int]) -> np.ndarray:
    pixels = np.zeros((h, w, 3), np.uint8)
    x0, y0, x1, y1 = box
    pixels[y0:y1, x0:x1] = 255
    return pixels


@pytest.mark.parametrize("box", [(250, 40, 330, 110), (5, 200, 60, 290), (150, 120, 260, 200)])
def test_boxes_move_with_the_pixels(box):
    """A box goes through each geometric step with the draw that moved the pixels: on every variant of 40
    images the moved box is the white rectangle's extent in the variant to within 2 px (holds it, when the
    frame's edge clipped a rotated box), or gone only when under half of the rectangle is left in the frame;
    the pixels are the same with or without boxes."""
    catalog = load_artifact_catalog()
    h, w = 300, 400
    pixels = _white_box_frame(h, w, box)
    area = (box[2] - box[0]) * (box[3] - box[1])
    moved_some = 0
    for i in range(40):
        steps = [s for s in plan_recipe(catalog, 42, "s", f"img{i}", i % 10, h, w)
                 if s["name"] in ("resized_crop", "rotate_translate")]
        with_boxes, _, moved = apply_steps(pixels, steps, {}, [dict(zip(("label", "xmin", "ymin", "xmax", "ymax"),
                                                                        ("polyp", *box)))])
        alone, _, _ = apply_steps(pixels, steps, {})
        assert np.array_equal(with_boxes, alone)
        ys, xs = np.nonzero(with_boxes[..., 0] > 127)
        if not moved:
            assert len(xs) < 0.5 * area * 1.2, f"img{i}: the box was dropped though the rectangle is in view"
            continue
        true = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        got = tuple(moved[0][k] for k in ("xmin", "ymin", "xmax", "ymax"))
        assert got[0] <= true[0] + 2 and got[1] <= true[1] + 2 and got[2] >= true[2] - 2 and got[3] >= true[3] - 2
        if 0 < got[0] and 0 < got[1] and got[2] < w and got[3] < h:  # not clipped: the extent itself
            assert max(abs(a - b) for a, b in zip(got, true)) <= 2, (i, got, true)
        moved_some += got != box
    assert moved_some >= 30  # the geometry did move the boxes


def test_the_geometric_base_keeps_the_middle_half_in_view():
    """prompts/question_classes.yaml leaves image-level findings out of `frame_dependent` because the
    geometric base keeps the middle half of the frame in view: markers at its corners survive 300 draws."""
    catalog = load_artifact_catalog()
    h, w = 300, 400
    corners = [(w // 4, h // 4), (3 * w // 4 - 1, h // 4), (w // 4, 3 * h // 4 - 1), (3 * w // 4 - 1, 3 * h // 4 - 1)]
    for i in range(300):
        steps = [s for s in plan_recipe(catalog, 7, "s", f"img{i}", 0, h, w) if s["name"] in ("resized_crop", "rotate_translate")]
        for x, y in corners:
            pixels = np.zeros((h, w, 3), np.uint8)
            pixels[y - 2:y + 3, x - 2:x + 3] = 255
            out, _, _ = apply_steps(pixels, steps, {})
            assert (out[..., 0] > 127).any(), f"img{i}: the point {(x, y)} left the frame"


def test_every_augmented_row_is_true_on_its_variant(sample_run):
    """For every (variant, row) of the `augmented` config, each box-derived answer equals the value
    recomputed from the variant's moved boxes in the row; a row holding a frame-dependent fact without boxes
    is on photometric-only variants (no crop, rotation or shift in their recipe); the rows left out are
    exactly the pairs whose recomputed value differs, and there are some on the sample."""
    import json

    import pyarrow.parquet as pq

    from augment.frames import variant_values
    from kvqa.catalog import load_catalog

    catalog = load_catalog()
    facts = read_table(sample_run / "stages" / "facts.parquet")
    by_key = {(f.source, f.img_id, f.question_class): f for f in facts.itertuples()}
    aug = read_table(sample_run / "stages" / "augmentations.parquet")
    variants = {(r.source, r.img_id, r.variant): r for r in aug.itertuples()}
    released = set()
    checked = 0
    for shard in sorted((sample_run / "release" / "augmented").glob("*.parquet")):
        for row in pq.read_table(shard, columns=["qa_id", "source", "img_id", "variant", "question_class",
                                                 "boxes"]).to_pylist():
            released.add((row["qa_id"], row["variant"]))
            v = variants[(row["source"], row["img_id"], row["variant"])]
            for c in row["question_class"]:
                f = by_key[(row["source"], row["img_id"], c)]
                if f.box_label:
                    checked += 1
                    assert variant_values(catalog, c, f.box_label, row["boxes"], v.width, v.height) == list(f.values)
                elif catalog.classes[c].frame_dependent:
                    steps = {s["name"] for s in json.loads(v.recipe)["steps"]}
                    assert not v.geometry and not steps & {"resized_crop", "rotate_translate"}, (row, c)
    assert checked > 0
    qa = read_table(sample_run / "stages" / "qa_dedup.parquet")
    box_rows = {r.qa_id: r for r in qa.itertuples() if any(by_key[(r.source, r.img_id, c)].box_label
                                                            for c in r.question_class)}
    left_out = 0
    for qa_id, r in box_rows.items():
        for k, v in variants.items():
            if k[:2] != (r.source, r.img_id) or (qa_id, k[2]) in released:
                continue
            moved = json.loads(v.boxes)
            assert any(variant_values(catalog, c, by_key[(r.source, r.img_id, c)].box_label, moved, v.width, v.height)
                       != list(by_key[(r.source, r.img_id, c)].values)
                       for c in r.question_class if by_key[(r.source, r.img_id, c)].box_label), (qa_id, k)
            left_out += 1
    report = json.loads((sample_run / "report.json").read_text())
    assert left_out == sum(report["release"]["augmented_left_out"].values()) > 0


def test_new_input_boxes_re_render_only_that_image(tmp_path):
    """A variant's record holds the boxes it moved: when an image's boxes change (a label fix) its variants
    are rendered again with the new boxes moved, the other images' variants stand."""
    frames = frame_plan(sample_frames(2))
    frames["boxes"] = [[{"label": "polyp", "xmin": 20, "ymin": 20, "xmax": 60, "ymax": 50}], []]
    settings = RenderSettings(load_artifact_catalog(), 42, 95, tmp_path / "run")
    table = settings.run_dir / "stages" / "augmentations.parquet"
    augment_images(frames, settings, table)
    first = read_table(table)
    frames["boxes"] = [[{"label": "polyp", "xmin": 30, "ymin": 20, "xmax": 70, "ymax": 50}], []]
    _, _, rendered = augment_images(frames, settings, table)
    again = read_table(table)
    changed = first["img_id"] == frames["img_id"][0]
    assert rendered == int(changed.sum()) == len(load_artifact_catalog().artifacts)
    assert (first.loc[changed, "boxes"] != again.loc[changed, "boxes"]).sum() >= 5  # some boxes leave the frame
    pd.testing.assert_frame_equal(first[~changed], again[~changed])
    # The pixels do not depend on the boxes: the re-rendered files are the same bytes.
    assert list(first["output_sha256"]) == list(again["output_sha256"])


def test_the_renamed_chunk_size_names_its_new_key():
    """`augment.chunk_size` became `augment.batch_size` ("chunk" is a task run's share only): an old config
    says what to write instead, not just "extra field"."""
    from pydantic import ValidationError

    from kvqa.config import AugmentConfig

    with pytest.raises(ValidationError, match="augment.chunk_size is now augment.batch_size"):
        AugmentConfig(chunk_size=8)
    assert AugmentConfig(batch_size=3).batch_size == 3
