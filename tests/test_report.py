"""The quality report (`report.html`): its figures, its sections on real builds, and a real browser."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
from browser import broken_images, is_blank, screenshot

from report import compare_shares, drawn_parameter_ranges, load_reference

SECTIONS = ["distribution", "lengths", "phrasings", "quarantine", "dedup", "augmented", "examples", "review"]


def test_reference_is_the_published_release():
    ref = load_reference()
    assert ref.rows == 159_549 == sum(ref.complexity.values())
    assert ref.complexity == {1: 54_856, 2: 52_349, 3: 52_344}
    assert len(ref.question_class) == 18 and ref.question_class["landmark_color"] == 534
    assert "SimulaMet/Kvasir-VQA-x1" in ref.source


def test_relative_difference_compares_shares_not_counts():
    items = {i["key"]: i for i in compare_shares({"a": 10, "b": 30, "new": 5}, 40, {"a": 50, "b": 50}, 100)}
    assert list(items) == ["a", "b", "new"]
    assert items["a"]["share"] == 0.25 and items["a"]["relative_difference"] == -0.5
    assert items["b"]["relative_difference"] == 0.5
    assert items["new"]["reference_share"] is None and items["new"]["relative_difference"] is None


def test_drawn_parameter_ranges_are_over_fired_steps_only():
    def recipe(rotate, fired, kernel):
        return json.dumps({"steps": [
            {"name": "rotate_translate", "transform": "Affine", "fired": True,
             "params": {"rotate": rotate, "shape": [9, 9, 3], "matrix": [[1]]}},
            {"name": "motion_blur", "transform": "MotionBlur", "fired": fired,
             "params": {"kernel": {"ndarray": [kernel, kernel], "mean": 0.1}}}]})

    ranges = {r["step"]: r for r in drawn_parameter_ranges(pd.DataFrame(
        {"recipe": [recipe(-3.5, True, 3), recipe(7.25, False, 9), recipe(1.0, True, 5)]}))}
    assert ranges["rotate_translate"]["params"] == {"rotate": [-3.5, 7.25]}  # shape, matrix: not drawn
    blur = ranges["motion_blur"]
    assert (blur["variants"], blur["fired"]) == (3, 2)
    assert blur["params"]["kernel size"] == [3.0, 5.0]  # the unfired 9 is not a drawn value


def _page(run: Path) -> str:
    page = run / "report.html"
    assert page.is_file(), "the build wrote no report.html"
    return page.read_text()


def test_report_on_the_sample_has_every_section_and_its_files(sample_run):
    text = _page(sample_run)
    for section in SECTIONS:
        assert f'<section id="{section}">' in text
    sources = re.findall(r'<img src="([^"]+)"', text)
    assert len(sources) > 20 and all((sample_run / s).is_file() for s in sources)
    assert "report_files/contact-sheet.png" in sources and "report_files/nearest-neighbour.png" in sources
    assert sum(s.startswith("report_files/thumbs/") for s in sources) >= 18  # a thumbnail per class at least
    assert "<b>Explanation</b>: " in text  # example rows carry the `explanations` config's text
    # leakage: the nearest train image of each test image as a histogram, the closest pairs with thumbnails
    assert "report_files/nearest-train-image.png" in sources and "Closest test / train image pairs" in text
    nearest = pd.read_parquet(sample_run / "stages/leakage_images.parquet").query("rank == 1")
    closest = nearest.sort_values("distance").iloc[0]
    assert f"report_files/thumbs/{closest.test_source}__{closest.test_img_id}.jpg" in sources
    assert f"report_files/thumbs/{closest.train_source}__{closest.train_img_id}.jpg" in sources
    assert "54856" in text and "Kvasir-VQA-x1" in text  # the reference beside our counts
    # the quarantine shows raw inputs: the dropped question's label row as read
    assert "sources / dropped_question" in text and "Is this finding easy to detect?" in text
    # parameter ranges actually drawn, from the augmentations table
    assert "motion_blur" in text and re.search(r"kernel size: \d+ &ndash; \d+", text)
    report = json.loads((sample_run / "report.json").read_text())
    assert report["quality_report"]["page"] == "report.html"


def test_report_on_a_release_with_dedup_removals_and_quarantine(capped_run):
    text = _page(capped_run)
    duplicates = pd.read_parquet(capped_run / "stages/duplicates.parquet")
    assert len(duplicates) and set(duplicates["rule"]) == {"cap"}
    assert f"global / cap ({len(duplicates):,})" in text  # removed rows by rule, with examples
    assert "report_files/dedup-rules.png" in text
    assert "No augmented track was made" in text
    assert "sources / dropped_question" in text  # quarantined label rows, with their raw input


def test_the_report_loads_in_a_real_browser(sample_run, tmp_path):
    n, broken = broken_images(sample_run / "report.html")
    assert n > 20 and broken == []
    shot = screenshot(sample_run / "report.html", tmp_path / "report.png")
    assert not is_blank(shot)


def test_the_browser_check_sees_a_broken_image_and_a_blank_page(sample_run, tmp_path):
    page = tmp_path / "page.html"
    (tmp_path / "ok.png").write_bytes((sample_run / "report_files/lengths.png").read_bytes())
    page.write_text('<html><body><img src="ok.png"><img src="missing.png"></body></html>')
    assert broken_images(page) == (2, ["missing.png"])
    blank = tmp_path / "blank.html"
    blank.write_text("<html><body></body></html>")
    assert is_blank(screenshot(blank, tmp_path / "blank.png"))


def test_a_missing_chromium_fails_under_ci_and_make_test_and_skips_with_a_reason_elsewhere(monkeypatch):
    import shutil

    import browser

    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.delenv("CHROMIUM", raising=False)
    for var in ("CI", "KVQA_REQUIRE_BROWSER"):
        monkeypatch.delenv("CI", raising=False)
        monkeypatch.delenv("KVQA_REQUIRE_BROWSER", raising=False)
        monkeypatch.setenv(var, "1")
        with pytest.raises(pytest.fail.Exception, match="headless Chromium not found.*make browser"):
            browser.chromium()
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("KVQA_REQUIRE_BROWSER", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt"):
        browser.chromium()
