"""The embedded sample is made by the project: the generator reproduces the committed files exactly."""

from __future__ import annotations

from conftest import SAMPLE_DIR, tree_digests
from data.make_sample import grid_cells, write_sample
from kvqa.config import KvasirVQASource
from sources import read_sources


def test_generator_reproduces_the_committed_sample(tmp_path):
    write_sample(tmp_path / "sample")
    assert tree_digests(tmp_path / "sample") == tree_digests(SAMPLE_DIR)


def test_sample_labels_parse_with_only_the_deliberate_quirks(catalog):
    parsed = read_sources([KvasirVQASource(metadata_csv=SAMPLE_DIR / "metadata.csv",
                                           image_dir=SAMPLE_DIR / "images")], catalog)
    assert set(parsed.quarantine["reason"]) == {"dropped_question", "empty_question"}
    assert set(parsed.facts["question_class"]) == {n for n, qc in catalog.classes.items() if qc.source_questions}
    raw = (SAMPLE_DIR / "metadata.csv").read_text()
    assert "lower-rigth" in raw and ",>20," in raw and "instrumnets" in raw  # real-file quirks present
    # Multi-polyp frames are labelled one row per polyp and merged into one fact.
    assert (parsed.facts["source_rows"].map(len) > 1).any()


def test_grid_cells_follow_the_documented_rule():
    import numpy as np

    mask = np.zeros((300, 300), bool)
    mask[0:100, 0:100] = True          # the whole upper-left cell
    mask[140:141, 140:141] = True      # one stray pixel: neither 4% of its cell nor 20% of the object
    assert grid_cells(mask) == ["upper-left"]
    small = np.zeros((300, 300), bool)
    small[140:150, 140:150] = True
    assert grid_cells(small) == ["center"]  # a small lesion still gets its cell
