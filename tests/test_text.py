"""One text normaliser (`kvqa.text.normalise_text`) for every use: two texts that differ only in spelling
(British / American), in typographic quotes or dashes, in case or spacing are the same text for the grounding
reader, for dedup's exact duplicates and for the catalog's token match."""

from __future__ import annotations

import pandas as pd
import pytest

import dedup
import generate.grounding
import generate.reader
import kvqa.catalog
from dedup import deduplicate
from generate.backends import PlanFact
from generate.grounding import GroundingChecker
from generate.reader import Reader, reading_form
from kvqa.config import DedupConfig
from kvqa.text import SPELLING, normalise_text
from sources.kvasir_vqa import parse_answer
from test_dedup import HashEncoder  # a fixed unit vector per text: only equal normalised texts are `exact`

# Question pairs that differ only in what normalisation removes.
QUESTION_PAIRS = [
    ("Is there oesophagitis in the image?", "Is there esophagitis in the image?"),
    ("Is there any oesophageal inflammation?", "Is there any esophageal inflammation?"),
    ("What colour is the abnormality?", "What color is the abnormality?"),
    ("Is the polyp in the centre of the image?", "Is the polyp in the center of the image?"),
    ("Is there a green/black box artefact?", "Is there a green/black box artifact?"),
    ("Are there haemorrhoids or a haemorrhage?", "Are there hemorrhoids or a hemorrhage?"),
    ("Is the caecum visible?", "Is the cecum visible?"),
    ("Is this Barrett\u2019s oesophagus?", "Is this Barrett's esophagus?"),
    ("Is the \u201cgreen\u201d box visible?", 'Is the "green" box visible?'),
    ("Is the polyp 5\u201310 mm wide?", "Is the polyp 5-10 mm wide?"),
    ("Is the instrument in the upper\u2014right  region?", "is the instrument in the upper-right region?"),
]

# (class, answer token, its American / ASCII twin): each pair must map onto the same canonical values.
TOKEN_PAIRS = [
    ("abnormality_presence", "oesophageal inflammation", "esophageal inflammation"),
    ("abnormality_presence", "inflammation of the oesophagus", "inflammation of the esophagus"),
    ("abnormality_presence", "Barrett\u2019s", "barrett's"),
    ("abnormality_presence", "haemorrhoids", "hemorrhoids"),
    ("abnormality_location", "centre\u2013left", "center-left"),
    ("abnormality_location", "lower centre", "lower center"),
    ("abnormality_location", "Upper\u2014Centre", "upper-center"),
    ("abnormality_color", "flesh coloured", "flesh colored"),
    ("landmark_presence", "caecum", "cecum"),
]


@pytest.mark.parametrize("a, b", QUESTION_PAIRS)
def test_the_normaliser_makes_the_pair_one_text(a, b):
    assert normalise_text(a) == normalise_text(b)
    assert normalise_text(a, punctuation=False) == normalise_text(b, punctuation=False)


@pytest.mark.parametrize("a, b", QUESTION_PAIRS)
def test_the_reader_reads_the_pair_alike(catalog, a, b):
    assert reading_form(a) == reading_form(b)
    reader = Reader(catalog)
    assert reader.read(a).statements == reader.read(b).statements


def test_the_grounding_check_judges_both_spellings_alike(catalog):
    checker = GroundingChecker(catalog)
    fact = [PlanFact("f0", "abnormality_presence", "multi_choice", ("oesophagitis",), "q", "a")]
    for q, a in [("Which abnormality is present in the image?", "The image shows oesophagitis."),
                 ("Which abnormality is present in the image?", "The image shows esophagitis."),
                 ("Which abnormality is present in the image?", "Oesophageal inflammation is visible."),
                 ("Which abnormality is present in the image?", "Esophageal inflammation is visible.")]:
        assert checker.check(q, a, fact) is None, a
    reader = Reader(catalog)
    for text in ("Oesophagitis is present.", "Esophagitis is present."):
        (st,) = reader.read(text).of("abnormality_presence")
        assert st.values == {"oesophagitis"} and st.polarity == "asserted", text


def test_dedup_removes_each_pair_as_an_exact_duplicate():
    rows = []
    for n, (a, b) in enumerate(QUESTION_PAIRS):
        rows += [{"qa_id": f"q{n}", "paraphrase_of": "", "source": "s", "img_id": f"img{n}",
                  "question_class": ["abnormality_presence"], "question": a},
                 {"qa_id": f"q{n}-p1", "paraphrase_of": f"q{n}", "source": "s", "img_id": f"img{n}",
                  "question_class": ["abnormality_presence"], "question": b}]
    kept, duplicates, figures, _ = deduplicate(pd.DataFrame(rows), DedupConfig(scopes=("image",)), HashEncoder(),
                                               None, seed=0)
    assert sorted(kept["qa_id"]) == sorted(f"q{n}" for n in range(len(QUESTION_PAIRS)))
    assert duplicates.set_index("qa_id")["rule"].to_dict() == {f"q{n}-p1": "exact"
                                                               for n in range(len(QUESTION_PAIRS))}
    assert figures["distinct_texts"] == len(QUESTION_PAIRS)


@pytest.mark.parametrize("cls, a, b", TOKEN_PAIRS)
def test_the_catalog_matches_both_tokens(catalog, cls, a, b):
    qc = catalog.classes[cls]
    assert parse_answer(qc, a) == parse_answer(qc, b)
    assert normalise_text(a) in qc.lookup and qc.lookup[normalise_text(a)] == qc.lookup[normalise_text(b)]


def test_punctuation_false_keeps_only_slash_and_hyphen():
    assert normalise_text("Is there a green/black box\u2014artefact, (yes\u2019 or no)?", punctuation=False) \
        == "is there a green/black box-artifact yes or no"
    assert normalise_text("  Is there a POLYP?\n ") == "is there a polyp?"


def test_the_readers_rewrites_are_not_normalisation():
    text = "Is the green and black box 5 - 10 millimetres from the polyp?"
    assert normalise_text(text) == "is the green and black box 5 - 10 millimeters from the polyp?"
    assert reading_form(text) == "is the green-black box 5-10mm from the polyp?"


def test_there_is_one_normaliser_and_one_spelling_table():
    assert ("oesophag", "esophag") in SPELLING and ("colour", "color") in SPELLING
    assert not hasattr(dedup, "normalise_question") and not hasattr(kvqa.catalog, "normalise_token")
    for module in (generate.reader, generate.grounding):
        assert not hasattr(module, "normalise") and not hasattr(module, "SPELLING")
