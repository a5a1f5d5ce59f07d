"""Plans: which atomic facts of one image a QA pair covers.

Level 1 is one plan per fact, as in the release. Level k (2 or 3) draws distinct k-combinations of one
image's facts without repetition; the draw is seeded by (config seed, source, img_id, k), so an image's
plans do not change when other images are added, removed or reordered.

Plans table (`stages/plans.parquet`):

| column | type | meaning |
|---|---|---|
| plan_id | str | stable id: hash of (source, img_id, complexity, sorted classes); becomes the row's qa_id |
| source | str | source name |
| img_id | str | image id |
| complexity | int | number of atomic facts (1-3) |
| fact_ids | list[str] | the facts covered, in catalog order |
"""

from __future__ import annotations

from itertools import combinations
from math import comb

import pandas as pd

from kvqa.config import PlanConfig
from kvqa.tables import HashDraws, stable_hash

PLAN_COLUMNS = ["plan_id", "source", "img_id", "complexity", "fact_ids"]


def plan_id(source: str, img_id: str, classes: list[str]) -> str:
    return stable_hash(source, img_id, len(classes), *sorted(classes))[:16]


def choose_combinations(n_facts: int, k: int, want: int, seed: int, *key: object) -> list[tuple[int, ...]]:
    """`want` distinct k-combinations of range(n_facts), sampled without repetition, in lexical order."""
    total = comb(n_facts, k)
    want = min(want, total)
    if want <= 0:
        return []
    all_combos = list(combinations(range(n_facts), k))
    if want == total:
        return all_combos
    picked = HashDraws(seed, "plans", *key, k).sample(total, want)
    return [all_combos[i] for i in sorted(picked)]


def compose_plans(facts: pd.DataFrame, config: PlanConfig, seed: int) -> pd.DataFrame:
    """Level-1 plans for every fact plus seeded level-2/3 combinations per image.

    `facts` must be in catalog order within each image (as `sources` writes it), which fixes the index
    space the combinations are drawn from.
    """
    rows: list[tuple] = []
    grouped: dict[tuple[str, str], tuple[list[str], list[str]]] = {}
    for source, img_id, fid, cls in zip(facts["source"], facts["img_id"], facts["fact_id"],
                                        facts["question_class"]):
        ids, classes = grouped.setdefault((source, img_id), ([], []))
        ids.append(fid)
        classes.append(cls)
    for (source, img_id), (ids, classes) in sorted(grouped.items()):
        for fid, cls in zip(ids, classes):
            rows.append((plan_id(source, img_id, [cls]), source, img_id, 1, [fid]))
        for k, ratio in config.level_ratios.items():
            want = round(ratio * len(ids))
            for combo in choose_combinations(len(ids), k, want, seed, source, img_id):
                rows.append((plan_id(source, img_id, [classes[i] for i in combo]), source, img_id, k,
                             [ids[i] for i in combo]))
    return pd.DataFrame(rows, columns=PLAN_COLUMNS)
