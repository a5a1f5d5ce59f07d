"""What every source reader shares: the quarantine collector and the label-CSV reader."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Iterator

import pandas as pd

from kvqa.tables import quarantine_frame

STAGE = "sources"


class Quarantine:
    """Collects the units (rows, boxes) a source reader rejects, each with its reason and the raw input."""

    def __init__(self, source: str):
        self.source = source
        self.rows: list[dict] = []

    def reject(self, key: str, reason: str, detail: str, raw: object) -> None:
        self.rows.append({"stage": STAGE, "source": self.source, "key": key, "reason": reason, "detail": detail,
                          "raw": json.dumps(raw, ensure_ascii=False, default=str)})

    def frame(self) -> pd.DataFrame:
        return quarantine_frame(self.rows)


def csv_rows(path: Path, required: tuple[str, ...], what: str) -> tuple[list[str], Iterator[tuple[int, list[str]]]]:
    """(header, iterator of (line number, fields) of every non-blank row); the header must name `required`."""
    f = open(path, newline="", encoding="utf-8-sig")
    reader = csv.reader(f)
    header = [h.strip() for h in next(reader, [])]
    missing = [c for c in required if c not in header]
    if missing:
        f.close()
        raise ValueError(f"{path}: not a {what}, header {header} lacks {missing}")

    def rows() -> Iterator[tuple[int, list[str]]]:
        with f:
            for row in reader:
                if row:  # a blank line is not a label row
                    yield reader.line_num, row
    return header, rows()
