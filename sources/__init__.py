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
| source_answer | str | the verbatim atomic answer; canonical `; `-joined when several rows were merged |
| source_rows | list[int] | the CSV line numbers the fact came from |
"""

from __future__ import annotations

import pandas as pd

from kvqa.catalog import Catalog
from kvqa.config import SourceConfig
from sources.kvasir_vqa import FACT_COLUMNS, ParsedSource, parse_kvasir_vqa_metadata

__all__ = ["FACT_COLUMNS", "ParsedSource", "parse_kvasir_vqa_metadata", "read_sources"]

READERS = {"kvasir_vqa": parse_kvasir_vqa_metadata}


def read_sources(sources: list[SourceConfig], catalog: Catalog) -> ParsedSource:
    """Read every configured source into one facts table and one quarantine table."""
    parsed = [READERS[src.kind](src, catalog) for src in sources]
    facts = pd.concat([p.facts for p in parsed], ignore_index=True)
    quarantine = pd.concat([p.quarantine for p in parsed], ignore_index=True)
    return ParsedSource(facts=facts, quarantine=quarantine, rows_read=sum(p.rows_read for p in parsed))
