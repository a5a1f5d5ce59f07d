"""The paraphrase band of the image scope, its calibration, and the global scope's near-identical groups."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from dedup import SentenceTransformerEncoder, calibration_pairs, deduplicate
from dedup.calibration import evaluate_band, pair_similarities, restatement_pairs
from dedup.near import global_recurrence, image_scope_duplicates, near_identical_pairs
from generate import GroundingChecker
from generate.backends import PlanFact
from kvqa.config import DedupConfig
from publish.card import _dedup_section

LOWER, UPPER = DedupConfig().threshold, DedupConfig().paraphrase_max_similarity


def unit(angle_deg: float) -> np.ndarray:
    """A 2-d unit vector: the cosine of two of them is the cosine of their angle difference."""
    a = math.radians(angle_deg)
    return np.array([math.cos(a), math.sin(a)], np.float32)


def angle(cosine: float) -> float:
    return math.degrees(math.acos(cosine))


def qa_frame(rows: list[tuple[str, str, str]], img_id: str = "img", classes=("polyp_count",)) -> pd.DataFrame:
    """(qa_id, paraphrase_of, question) rows of one image and class set."""
    return pd.DataFrame({"qa_id": [r[0] for r in rows], "paraphrase_of": [r[1] for r in rows],
                         "source": "kvasir-vqa", "img_id": img_id, "question": [r[2] for r in rows],
                         "question_class": [list(classes)] * len(rows)})


def removals(qa: pd.DataFrame, texts: list[str], vectors: np.ndarray) -> dict[str, tuple]:
    out = image_scope_duplicates(qa, texts, vectors, LOWER, UPPER)
    return {d["qa_id"]: (d["rule"], d["duplicate_of"], d["similarity"]) for d in out}


def test_band_logic_keeps_faithful_removes_verbatim_and_drifted():
    """Vectors at chosen angles from the source: the rule's logic, apart from any model."""
    qa = qa_frame([("plan", "", "source"), ("plan-p1", "plan", "verbatim"), ("plan-p2", "plan", "faithful"),
                   ("plan-p3", "plan", "drifted"), ("plan-p4", "plan", "copy of faithful"),
                   ("plan-p5", "plan", "source"), ("plan-p6", "plan", "far but close to faithful")])
    faithful = angle((LOWER + UPPER) / 2)  # in the band: kept
    vectors = np.stack([unit(0), unit(angle(UPPER) / 2),  # closer than the upper bound: adds nothing
                        unit(faithful), unit(-angle(LOWER) - 5),  # further than the lower bound: drifted
                        unit(faithful + 1),  # a copy of the kept faithful paraphrase, not of the source
                        unit(0),  # the source's own text again: exact
                        unit(faithful + angle(UPPER) + 5)])  # drifted from the source, in band of p2
    texts = list(qa["question"])
    got = removals(qa, texts, vectors)
    assert set(got) == {"plan-p1", "plan-p3", "plan-p4", "plan-p5", "plan-p6"}  # plan, plan-p2 kept
    assert got["plan-p1"][:2] == ("near", "plan") and got["plan-p1"][2] >= UPPER
    assert got["plan-p3"][:2] == ("drifted", "plan") and got["plan-p3"][2] < LOWER
    assert got["plan-p4"][:2] == ("near", "plan-p2")  # too close to a kept paraphrase
    assert got["plan-p5"] == ("exact", "plan", 1.0)
    assert got["plan-p6"][:2] == ("drifted", "plan")  # judged against its source, not the nearest row


def test_paraphrase_is_a_column_not_an_id_pattern():
    """A row whose id looks like a paraphrase's but paraphrases nothing is a plan's own row (kept first),
    and a paraphrase is one by its column whatever its id."""
    qa = qa_frame([("zz", "", "source"), ("aa-p1", "", "another plan row"), ("bb", "zz", "reworded")])
    vectors = np.stack([unit(0), unit(angle(UPPER) / 2), unit(angle(LOWER) + 10)])
    got = removals(qa, list(qa["question"]), vectors)
    # Both rows without `paraphrase_of` come first (by qa_id), so "aa-p1" is kept and "zz" is its duplicate;
    # "bb" is checked against its source "zz" (removed or not, its source) and has drifted.
    assert got == {"zz": ("near", "aa-p1", pytest.approx(math.cos(math.radians(angle(UPPER) / 2)), abs=1e-4)),
                   "bb": ("drifted", "zz", pytest.approx(math.cos(math.radians(angle(LOWER) + 10)), abs=1e-4))}


def test_paraphrase_of_a_missing_row_is_removed_as_orphan_and_counted():
    qa = qa_frame([("plan", "", "source"), ("gone-p1", "gone", "lonely")])
    got = removals(qa, list(qa["question"]), np.stack([unit(0), unit(30)]))
    assert list(got) == ["gone-p1"] and got["gone-p1"][:2] == ("orphan", "gone") and math.isnan(got["gone-p1"][2])


def test_band_needs_room():
    with pytest.raises(ValueError, match="paraphrase_max_similarity"):
        DedupConfig(threshold=0.9, paraphrase_max_similarity=0.9)


@pytest.fixture(scope="module")
def encoder():
    return SentenceTransformerEncoder()


def test_paraphrase_band_with_the_real_model(encoder, tmp_path):
    """A faithful paraphrase is kept, a verbatim one removed, a drifted one rejected: all-MiniLM-L6-v2."""
    source = "Where in the image is the instrument?"
    paraphrases = {
        "p1": "where in the image is the instrument",  # case and punctuation: exact
        "p2": "Where is the instrument in the image?",  # the same words reordered: adds nothing
        "p3": "In which region of the frame is the instrument located?",  # faithful, reworded: kept
        "p4": "What is the location of the tool with respect to the lesion?",  # another frame of reference
        "p5": "In which region of the frame is the instrument situated?",  # p3 again, one word swapped
    }
    qa = qa_frame([("plan", "", source)] + [(f"plan-{k}", "plan", q) for k, q in paraphrases.items()],
                  classes=("instrument_location",))
    other_image = qa.assign(img_id="other", qa_id="o-" + qa.qa_id,
                            paraphrase_of=qa.paraphrase_of.where(qa.paraphrase_of == "", "o-plan"))
    both = pd.concat([qa, other_image], ignore_index=True)
    kept, dups, figures, _ = deduplicate(both, DedupConfig(scopes=("image",)), encoder, None, seed=1)
    assert len(kept) + len(dups) == len(both) == figures["rows_in"]
    by_id = dups.set_index("qa_id")
    for prefix in ("", "o-"):  # each image on its own: the same outcome on both
        assert set(kept.qa_id[kept.img_id == ("other" if prefix else "img")]) == {f"{prefix}plan", f"{prefix}plan-p3"}
        assert by_id.loc[f"{prefix}plan-p1", "rule"] == "exact"
        assert by_id.loc[f"{prefix}plan-p2", "rule"] == "near" and by_id.loc[f"{prefix}plan-p2", "similarity"] >= UPPER
        assert by_id.loc[f"{prefix}plan-p4", "rule"] == "drifted" and by_id.loc[f"{prefix}plan-p4", "similarity"] < LOWER
        assert by_id.loc[f"{prefix}plan-p4", "duplicate_of"] == f"{prefix}plan"
        assert tuple(by_id.loc[f"{prefix}plan-p5", ["rule", "duplicate_of"]]) == ("near", f"{prefix}plan-p3")
    assert figures["paraphrases_in"] == 10 and figures["paraphrases_kept"] == 2
    assert figures["removed_by"] == {"image/drifted": 2, "image/exact": 2, "image/near": 4}


# Floors of the paraphrase band at the configured bounds (docs/design.md, Deduplication). Each holds at the default
# and fails at a wrong bound (checked below).
BAND_FLOORS = {"drift recall": 0.29, "faithful rejected as drifted at most": 0.09,
               "restatement recall": 0.78, "rephrasings removed at most": 0.16, "rephrasings kept": 0.72}


def broken_band_floors(figures: dict) -> list[str]:
    measured = {"drift recall": figures["drift"]["recall"],
                "faithful rejected as drifted at most": figures["drift"]["false_positive_rate"],
                "restatement recall": figures["duplicate"]["recall"],
                "rephrasings removed at most": figures["duplicate"]["false_positive_rate"],
                "rephrasings kept": figures["rephrasings_kept"]}
    return [k for k, floor in BAND_FLOORS.items()
            if (measured[k] > floor if k.endswith("at most") else measured[k] < floor)]


@pytest.fixture(scope="module")
def band_sets(catalog, encoder):
    meaning, restatements = calibration_pairs(catalog), restatement_pairs(catalog)
    return meaning, restatements, pair_similarities(meaning, encoder), pair_similarities(restatements, encoder)


def test_restatement_pairs_are_questions_the_pipeline_could_compare(catalog):
    pairs = restatement_pairs(catalog)
    checker = GroundingChecker(catalog)
    for a, b, classes in zip(pairs.a, pairs.b, pairs.classes):
        facts = [PlanFact("f", c, catalog.classes[c].answer_type, (), "", "") for c in classes]
        assert checker.check_question(a, facts) is None and checker.check_question(b, facts) is None, (classes, b)
    assert pairs.groupby("classes").restatement.nunique().eq(2).all()  # both labels in every class set
    assert len(pairs) == 192 and pairs.restatement.sum() == 96


def test_band_calibration_floors(band_sets, encoder):
    meaning, restatements, ms, rs = band_sets
    figures = evaluate_band(meaning, restatements, encoder, LOWER, UPPER, ms, rs)
    assert broken_band_floors(figures) == [], figures
    # The rule is wrong both ways on both bounds: no cosine separates these sets.
    assert figures["drift"]["fp"] > 0 and figures["drift"]["fn"] > 0
    assert figures["duplicate"]["fp"] > 0 and figures["duplicate"]["fn"] > 0
    # The floors fail at wrong bounds: too low a lower bound lets drifted paraphrases through, too high
    # rejects faithful ones; too low an upper bound removes rephrasings, too high keeps restatements.
    assert "drift recall" in broken_band_floors(evaluate_band(meaning, restatements, encoder, 0.4, UPPER, ms, rs))
    assert "faithful rejected as drifted at most" in broken_band_floors(
        evaluate_band(meaning, restatements, encoder, 0.6, UPPER, ms, rs))
    assert "rephrasings removed at most" in broken_band_floors(
        evaluate_band(meaning, restatements, encoder, LOWER, 0.85, ms, rs))
    assert "restatement recall" in broken_band_floors(
        evaluate_band(meaning, restatements, encoder, LOWER, 0.95, ms, rs))


def chain(n: int, step_deg: float) -> np.ndarray:
    """n unit vectors, each `step_deg` from the previous: neighbours are close, the ends are not."""
    return np.stack([unit(i * step_deg) for i in range(n)])


def test_global_groups_have_a_bounded_diameter():
    """A chain of phrasings, each near-identical to the next only: connected components make one group of
    all of them (what the card used to report); leader groups keep every member within the threshold of
    its leader, and the pair count is exact."""
    threshold = 0.95
    step = angle(threshold) * 0.6  # neighbours within the threshold, neighbours of neighbours not
    vectors = chain(12, step)
    texts = [f"phrasing {i:02d}" for i in range(12)]
    texts += ["phrasing 05"] * 3  # the most repeated phrasing leads its group
    vectors = np.vstack([vectors, np.repeat(vectors[5:6], 3, axis=0)])
    qa = pd.DataFrame({"qa_id": [f"q{i}" for i in range(len(texts))]})
    figures, capped = global_recurrence(qa, texts, vectors, threshold, None, seed=1)
    assert capped == [] and figures["rows"] == 15 and figures["distinct_phrasings"] == 12
    assert figures["most_repeated"][0] == ["phrasing 05", 4]
    assert figures["near_identical_pairs"] == 11  # consecutive pairs only
    assert figures["phrasings_with_a_near_identical_neighbour"] == 12
    largest = figures["largest_near_identical_groups"]
    assert largest[0]["leader"] == "phrasing 05" and largest[0]["phrasings"] == 3 and largest[0]["rows"] == 6
    assert all(g["phrasings"] <= 3 and g["min_similarity_to_leader"] >= threshold for g in largest)
    assert figures["near_identical_groups"] == len(largest) and sum(g["phrasings"] for g in largest) == \
        figures["phrasings_in_near_identical_groups"]
    # The card says what the figures are: pairs, phrasings with a neighbour, bounded groups and their leaders.
    card = "\n".join(_dedup_section({"model": "m", "threshold": LOWER, "paraphrase_max_similarity": UPPER,
                                      "rows_in": 15, "rows_kept": 15, "rows_removed": 0, "global": figures}))
    assert "| pairs of distinct phrasings with cosine >= 0.95 | 11 |" in card
    assert "| phrasings with another within cosine >= 0.95 | 12 |" in card
    assert "| phrasing 05 | 3 | 6 |" in card and "| phrasing 05 | 4 |" in card


def test_near_identical_pairs_match_brute_force():
    rng = np.random.default_rng(3)
    base = rng.normal(size=(40, 16)).astype(np.float32)
    vectors = np.vstack([base, base + rng.normal(scale=0.15, size=base.shape).astype(np.float32)])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    sims = vectors @ vectors.T
    for threshold in (0.9, 0.97):
        want = {(i, j) for i in range(len(vectors)) for j in range(i + 1, len(vectors)) if sims[i, j] >= threshold}
        a, b, s = near_identical_pairs(vectors, threshold)
        assert set(zip(a.tolist(), b.tolist())) == want and len(want) > 0
        assert (s >= threshold).all()


def test_llm_paraphrases_through_the_band(real_csv, catalog, encoder, tmp_path, monkeypatch):
    """End to end: the `openai` backend against the loopback stand-in writes paraphrase rows with their
    `paraphrase_of`, and dedup sorts the stand-in's three kinds: the verbatim copy always goes (exact), the
    faithful rewording mostly stays, the drifted question is rejected as often as the model can tell."""
    from openai_standin import OpenAIStandIn

    from generate import compose_plans, make_backend, realize_plans
    from kvqa.config import GenerateConfig, KvasirVQASource, LLMConfig, PlanConfig
    from sources import read_sources

    facts = read_sources([KvasirVQASource(metadata_csv=real_csv, image_dir=real_csv.parent)], catalog).facts
    facts = facts[facts.img_id.isin(sorted(facts.img_id.unique())[100:112])].reset_index(drop=True)
    plans = compose_plans(facts, PlanConfig(), seed=42)
    monkeypatch.setenv("KVQA_TEST_KEY", "sk-test")
    with OpenAIStandIn() as standin:
        cfg = GenerateConfig(backend="openai", llm=LLMConfig(
            base_url=standin.url, cache_dir=tmp_path / "c", concurrency=8, api_key_env="KVQA_TEST_KEY",
            naturalize_variants=3))
        qa, rejected = realize_plans(plans, facts, make_backend(cfg, catalog, seed=42), GroundingChecker(catalog))
    assert rejected.empty and (qa.paraphrase_of == "").sum() == len(plans) and len(qa) == 4 * len(plans)
    kept, dups, figures, _ = deduplicate(qa, DedupConfig(scopes=("image",)), encoder, None, seed=42)
    assert len(kept) + len(dups) == len(qa) and set(plans.plan_id) <= set(kept.qa_id)
    rule = dict(zip(dups.qa_id, dups.rule))
    kind = {"1": "verbatim", "2": "faithful", "3": "drifted"}
    variants = qa[qa.paraphrase_of != ""]  # `<plan_id>-pN`, N in the stand-in's order
    outcome = pd.crosstab(variants.qa_id.str[-1].map(kind), variants.qa_id.map(rule).fillna("kept"))
    assert dict(outcome.loc["verbatim"][lambda s: s > 0]) == {"exact": len(plans)}
    assert outcome.loc["faithful", "kept"] >= 0.8 * len(plans)
    assert outcome.loc["drifted", "drifted"] >= 0.4 * len(plans)
    assert (dups.duplicate_of == dups.qa_id.map(dict(zip(qa.qa_id, qa.paraphrase_of)))).all()
