"""What the augmented track may do to each image's frame, and what each variant's rows may still say.

The geometric base (crop, rotation, shift) moves what is in the frame, so an answer about where things are,
how much of the frame they fill, how many are in it, or what lies at its edges (the catalog's
`frame_dependent` classes) can be false on a variant. Two cases:

- a fact derived from boxes (`box_label` in the facts table) is recomputed per variant from the variant's
  boxes, which went through the same seeded geometry as its pixels (`augment.render.apply_steps`); a release
  row is joined to a variant only when every such fact of the row keeps its value there
  (`changed_on_variant`), and the variant's boxes are the row's boxes;
- a frame-dependent fact without boxes (Kvasir-VQA's label-only locations and counts, text, the corner box
  artefact) cannot be recomputed, so every variant of its image is photometric only: the geometric steps
  are left out of its recipe, the artifact and the photometric base still run (`frame_plan`).

Frame plan (`frame_plan`), one row per usable image: the image table's columns plus `geometry` (bool) and
`boxes` (the image's boxes, every box fact's boxes once, in fact order).
"""

from __future__ import annotations

import json
from typing import Iterable

import pandas as pd

from kvqa.catalog import BoxFeed, Catalog
from kvqa.tables import plain_boxes
from sources.boxes import Box, derive_values


def frame_plan(images: pd.DataFrame, facts: pd.DataFrame | None = None, catalog: Catalog | None = None) -> pd.DataFrame:
    """`images` with `geometry` (False when the image has a frame-dependent fact without boxes) and
    `boxes` (its box facts' boxes, each once). Without facts (images with no labels: the benchmarks),
    every image is geometric and has no boxes."""
    dependent = {name for name, qc in catalog.classes.items() if qc.frame_dependent} if catalog else set()
    fixed, boxes = set(), {}
    for f in (facts.itertuples(index=False) if facts is not None else ()):
        key = (f.source, f.img_id)
        if f.question_class in dependent and not f.box_label:
            fixed.add(key)
        seen = boxes.setdefault(key, [])
        seen += [b for b in plain_boxes(f.boxes) if b not in seen]
    keys = list(zip(images["source"], images["img_id"]))
    return images.assign(geometry=[k not in fixed for k in keys], boxes=[boxes.get(k, []) for k in keys])


def box_derivation(catalog: Catalog, question_class: str, box_label: str) -> str:
    """How the class's values follow from the boxes of `box_label` (its feed's `derive`)."""
    return next(f.derive for f in catalog.classes[question_class].feeds
                if isinstance(f, BoxFeed) and f.label == box_label)


def variant_values(catalog: Catalog, question_class: str, box_label: str, boxes: Iterable[dict],
                   width: int, height: int) -> list[str] | None:
    """A box fact's values on a variant, from the variant's boxes (None: nothing left to locate or size)."""
    picked = [Box(**b) for b in boxes if b["label"] == box_label]
    return derive_values(box_derivation(catalog, question_class, box_label), picked, width, height)


def changed_on_variant(catalog: Catalog, row_facts: list[dict], variant_boxes: list[dict], width: int,
                       height: int) -> list[str]:
    """The classes of a row whose box-derived value differs on the variant (empty: the row stays true)."""
    return [f["question_class"] for f in row_facts if f["box_label"]
            and variant_values(catalog, f["question_class"], f["box_label"], variant_boxes, width, height)
            != list(f["values"])]


def parse_boxes(text: str) -> list[dict]:
    """The `boxes` column of the augmentations table."""
    return json.loads(text) if text else []
