"""Source labels -> atomic facts.

A fact is one (source, img_id, question_class) with canonical, sorted values: the unit that level-1 pairs
realise one-to-one and that level-2/3 plans combine. Every source reader returns the facts it could read
and a quarantine table for everything it could not, so that input rows = rows in facts + rows quarantined.

Facts table (`stages/facts.parquet`):

| column | type | meaning |
|---|---|---|
| fact_id | str | stable id: hash of (source, img_id, question_class) |
| source | str | the config's source name (e.g. `kvasir-vqa`) |
| img_id | str | image id within that source |
| source_label | str | the source's own image category (Kvasir-VQA `source`: Polyps, Normal, ...) |
| question_class | str | catalog class name |
| answer_type | str | catalog answer type |
| values | list[str] | canonical values in vocabulary order (a count is one decimal string) |
| source_question | str | the verbatim atomic question |
| source_answer | str | the verbatim atomic answer (Kvasir-VQA; canonical `; `-joined when several rows were merged), or the canonical values (label and box facts) |
| source_file | str | name of the label file the fact came from |
| source_rows | list[int] | the units of that file it came from: CSV line numbers, or box numbers (1-based, file order) |
| boxes | list[struct] | the boxes behind a box fact: label, xmin, ymin, xmax, ymax in pixels of the image as displayed (EXIF orientation applied) |
| box_label | str | the box label whose boxes the fact is derived from (its class's `feeds` say how), "" for a label fact; a box fact with no box (a count of 0) has one too |

Sources (`kind` in the config): `kvasir_vqa` (sources/kvasir_vqa.py), `hyperkvasir` (labels + optional
polyp boxes, sources/hyperkvasir.py), `boxes` (Kvasir-Instrument JSON or Kvasir-SEG masks,
sources/boxes.py). Ids stay as the source has them; `(source, img_id)` is the key everywhere. An id becomes
a file name, so every reader holds it to one rule (`sources.common.bad_id`) and quarantines it as `bad_id`
otherwise; a label file that cannot be read at all raises `LabelFileError` (one line: `path:line: what`).
"""

from __future__ import annotations

import pandas as pd

from kvqa.catalog import Catalog
from kvqa.config import SourceConfig
from sources.boxes import parse_boxes_source
from sources.common import FACT_COLUMNS, LabelFileError, ParsedSource, bad_id
from sources.conflicts import CheckedSources, quarantine_label_conflicts
from sources.hyperkvasir import parse_hyperkvasir
from sources.kvasir_vqa import parse_kvasir_vqa_metadata

__all__ = ["FACT_COLUMNS", "CheckedSources", "LabelFileError", "ParsedSource", "bad_id", "parse_boxes_source",
           "parse_hyperkvasir", "parse_kvasir_vqa_metadata", "read_sources", "units_in_facts"]

READERS = {"kvasir_vqa": parse_kvasir_vqa_metadata, "hyperkvasir": parse_hyperkvasir, "boxes": parse_boxes_source}


def units_in_facts(facts: pd.DataFrame) -> int:
    """Distinct label units (rows, boxes) behind the facts: one row can feed several facts."""
    return len({(s, f, int(u)) for s, f, units in zip(facts["source"], facts["source_file"], facts["source_rows"])
                for u in units})


def read_sources(sources: list[SourceConfig], catalog: Catalog) -> CheckedSources:
    """Read every configured source into one facts table and one quarantine table; facts whose labels
    conflict across classes (the catalog's `conflicts:` rules) are quarantined, counted per rule."""
    parsed = [READERS[src.kind](src, catalog) for src in sources]
    facts = pd.concat([p.facts for p in parsed], ignore_index=True)
    quarantine = pd.concat([p.quarantine for p in parsed], ignore_index=True)
    return quarantine_label_conflicts(ParsedSource(facts=facts, quarantine=quarantine,
                                                   rows_read=sum(p.rows_read for p in parsed)), catalog)
