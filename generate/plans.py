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

import json
from itertools import combinations
from math import comb
from pathlib import Path

import pandas as pd

from kvqa.config import PlanConfig
from kvqa.tables import HashDraws, stable_hash, write_json

PLAN_COLUMNS = ["plan_id", "source", "img_id", "complexity", "fact_ids"]
# The classes added to a built run with `kvqa add-class`, in order: the plans stage draws the base plans
# without them and each added class's plans on top, so a later build of the same run reproduces the same
# rows (and a fresh run folder, without the file, regenerates from scratch).
ADDITIONS_FILE = "class_additions.json"


def class_additions(run_dir: Path) -> tuple[str, ...]:
    path = Path(run_dir) / ADDITIONS_FILE
    return tuple(json.loads(path.read_text())["classes"]) if path.is_file() else ()


def write_class_additions(run_dir: Path, classes: tuple[str, ...]) -> None:
    if classes:
        write_json({"classes": list(classes)}, Path(run_dir) / ADDITIONS_FILE)
    else:
        (Path(run_dir) / ADDITIONS_FILE).unlink(missing_ok=True)


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


def compose_plans(facts: pd.DataFrame, config: PlanConfig, seed: int,
                  added_classes: tuple[str, ...] = ()) -> pd.DataFrame:
    """Level-1 plans for every fact plus seeded level-2/3 combinations per image.

    `facts` must be in catalog order within each image (as `sources` writes it), which fixes the index
    space the combinations are drawn from. `added_classes` are classes added to a built run with
    `kvqa add-class`, in the order they were added: the base plans are drawn without them, exactly as
    before they existed, and each added class then gets its own plans on top (`add_class_plans`), so
    adding a class never changes a plan that existed.
    """
    added = set(added_classes)
    base = facts[~facts["question_class"].isin(added)]
    rows: list[tuple] = []
    for (source, img_id), (ids, classes) in sorted(_by_image(base).items()):
        for fid, cls in zip(ids, classes):
            rows.append((plan_id(source, img_id, [cls]), source, img_id, 1, [fid]))
        for k, ratio in config.level_ratios.items():
            want = round(ratio * len(ids))
            for combo in choose_combinations(len(ids), k, want, seed, source, img_id):
                rows.append((plan_id(source, img_id, [classes[i] for i in combo]), source, img_id, k,
                             [ids[i] for i in combo]))
    known = base
    for cls in added_classes:
        new = facts[facts["question_class"] == cls]
        rows += add_class_plans(new, known, config, seed)
        known = pd.concat([known, new])
    return pd.DataFrame(rows, columns=PLAN_COLUMNS)


def _by_image(facts: pd.DataFrame) -> dict[tuple[str, str], tuple[list[str], list[str]]]:
    grouped: dict[tuple[str, str], tuple[list[str], list[str]]] = {}
    for source, img_id, fid, cls in zip(facts["source"], facts["img_id"], facts["fact_id"],
                                        facts["question_class"]):
        ids, classes = grouped.setdefault((source, img_id), ([], []))
        ids.append(fid)
        classes.append(cls)
    return grouped


def add_class_plans(new: pd.DataFrame, known: pd.DataFrame, config: PlanConfig, seed: int) -> list[tuple]:
    """Plans of one added class: its level-1 plans, and per fact round(ratio) level-k combinations of the
    fact with k-1 facts the image already had, drawn by hash of (seed, source, img_id, k, class)."""
    known_by_image = _by_image(known)
    rows = []
    for source, img_id, fid, cls in sorted(zip(new["source"], new["img_id"], new["fact_id"], new["question_class"]),
                                           key=lambda r: (r[0], r[1])):
        rows.append((plan_id(source, img_id, [cls]), source, img_id, 1, [fid]))
        ids, classes = known_by_image.get((source, img_id), ([], []))
        for k, ratio in config.level_ratios.items():
            for combo in choose_combinations(len(ids), k - 1, round(ratio), seed, source, img_id, "add", cls):
                rows.append((plan_id(source, img_id, [*(classes[i] for i in combo), cls]), source, img_id, k,
                             [*(ids[i] for i in combo), fid]))
    return rows
