"""What every source reader shares: the facts table's shape, the image-id rule, the quarantine collector,
the one exception for a label file that cannot be read, and the label-CSV and JSON readers.

A label file is either read, with every unit (CSV line, box, mask file) ending in a fact or in the
quarantine, or refused whole with a `LabelFileError` whose message is one line, `path:line: what`. Nothing
in between: no other exception type leaves a reader for a bad file.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from kvqa.catalog import Catalog
from kvqa.errors import BadInput
from kvqa.tables import quarantine_frame

STAGE = "sources"

FACT_COLUMNS = [
    "fact_id", "source", "img_id", "source_label", "question_class", "answer_type",
    "values", "source_question", "source_answer", "source_file", "source_rows", "boxes", "box_label",
]

# An image id becomes a file name (`<image_dir>/<img_id>.jpg`, `augmented/<source>/<img_id>/...`), so it must
# be one safe path component: no `/`, `\`, NUL or leading `.` (so never `.`, `..` or a hidden file), not
# absolute, not empty, short enough for any file system. Every real id (Kvasir-VQA cuids, HyperKvasir UUIDs,
# Kvasir-Instrument and Kvasir-SEG ids) passes.
MAX_ID_CHARS = 200
IMG_ID_RE = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_.-]{{0,{MAX_ID_CHARS - 1}}}")
ID_RULE = (f"letters, digits, '_', '.', '-', starting with a letter or digit, at most {MAX_ID_CHARS} characters")

# A label row is a few hundred bytes; a line longer than the csv module's field limit is not a row.
MAX_LINE_BYTES = csv.field_size_limit()


def bad_id(value: object) -> str | None:
    """Why `value` cannot be an image id (it would not be one safe path component), or None when it can."""
    if isinstance(value, str) and IMG_ID_RE.fullmatch(value):
        return None
    return f"image id {value!r} is not a safe file name ({ID_RULE})"


class LabelFileError(BadInput):
    """A label file that cannot be read at all (missing, empty, binary, wrong header, not JSON, rows that
    cannot be split): the run stops before anything is built. The message is one line, `path:line: what`."""

    def __init__(self, path: Path | str, line: int | None, what: str):
        self.path, self.line, self.what = Path(path), line, what
        where = f"{path}:{line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {' '.join(what.split())}")


@dataclass
class ParsedSource:
    facts: pd.DataFrame
    quarantine: pd.DataFrame
    rows_read: int = 0


def order_facts(facts: list[dict], catalog: Catalog) -> pd.DataFrame:
    """Facts in (source, img_id, catalog order): the index space plans draw combinations from."""
    order = {name: i for i, name in enumerate(catalog.classes)}
    facts_df = pd.DataFrame(facts, columns=FACT_COLUMNS)
    if len(facts_df):
        facts_df = (facts_df.assign(_o=facts_df["question_class"].map(order))
                    .sort_values(["source", "img_id", "_o"], kind="stable").drop(columns="_o")
                    .reset_index(drop=True))
    return facts_df


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


def read_label_bytes(path: Path, what: str) -> bytes:
    """The bytes of a label file, or a LabelFileError saying why there are none."""
    path = Path(path)
    if path.is_dir():
        raise LabelFileError(path, None, f"is a folder, expected a {what}")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise LabelFileError(path, None, f"not found, expected a {what}") from None
    except OSError as err:
        raise LabelFileError(path, None, f"cannot be read: {err.strerror or err}") from None
    if not data.strip():
        raise LabelFileError(path, None, f"empty file, expected a {what}")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise LabelFileError(path, 1, f"UTF-16 text (byte-order mark); save the {what} as UTF-8")
    return data


def _not_utf8(err: UnicodeDecodeError) -> str:
    return f"not UTF-8 text: byte 0x{err.object[err.start]:02x} at column {err.start + 1}"


@dataclass
class CsvRows:
    header: list[str]
    header_line: int
    rows: list[tuple[int, list[str]]]  # (physical line number, fields) of every row split into len(header) fields
    lines_read: int  # non-blank physical lines after the header: rows + lines quarantined here


def csv_rows(path: Path, required: tuple[str, ...], what: str, quarantine: Quarantine) -> CsvRows:
    """Split a label CSV into rows, one physical line each.

    Label rows never span lines (no real label file has a newline inside a field), so each line is parsed
    on its own: an unterminated quote garbles its own line, not the rest of the file. A line that is not
    UTF-8, holds a NUL byte, has a broken quote or the wrong number of fields is quarantined as
    `malformed_row` with its line number; every non-blank line after the header is counted in `lines_read`.
    Refused whole (LabelFileError): a missing, empty, binary or non-UTF-8-header file, a header lacking
    `required`, a line longer than `MAX_LINE_BYTES`, or a file where more than half the lines cannot be
    split (it is not a label CSV, and quarantining it line by line would hide that).
    """
    path = Path(path)
    data = read_label_bytes(path, what)
    lines = data.removeprefix(b"\xef\xbb\xbf").split(b"\n")
    header: list[str] | None = None
    header_line = 0
    rows: list[tuple[int, list[str]]] = []
    bad: list[tuple[int, str]] = []
    lines_read = 0
    for number, raw in enumerate(lines, start=1):
        raw = raw.removesuffix(b"\r")
        if header is None and b"\0" in raw:
            raise LabelFileError(path, number, f"binary file (NUL byte), not a {what}")
        if len(raw) > MAX_LINE_BYTES:
            raise LabelFileError(path, number, f"line of {len(raw):,} bytes, longer than a label row can be "
                                               f"({MAX_LINE_BYTES:,}); not a {what}")
        if not raw.strip():
            continue  # a blank line is not a label row
        try:
            text = raw.decode("utf-8")
            fields, problem = _split_line(text)
        except UnicodeDecodeError as err:
            text, fields, problem = raw.decode("utf-8", "backslashreplace"), None, _not_utf8(err)
        if header is None:
            if problem:
                raise LabelFileError(path, number, f"header: {problem}; not a {what}")
            header, header_line = [h.strip() for h in fields], number
            missing = [c for c in required if c not in header]
            if missing:
                raise LabelFileError(path, number, f"not a {what}: header {header} lacks {missing}")
            continue
        lines_read += 1
        if problem is None and len(fields) != len(header):
            problem = f"{len(fields)} fields, expected {len(header)}"
        if problem:
            bad.append((number, problem))
            quarantine.reject(f"line {number}", "malformed_row", problem, fields if fields is not None else text)
        else:
            rows.append((number, fields))
    if header is None:  # nothing but a byte-order mark and blank lines
        raise LabelFileError(path, None, f"empty file, expected a {what}")
    if not lines_read:
        raise LabelFileError(path, None, f"no rows after the header, expected a {what}")
    if 2 * len(bad) > lines_read:
        first, problem = bad[0]
        raise LabelFileError(path, first, f"{len(bad):,} of {lines_read:,} lines cannot be split into the header's "
                                          f"{len(header)} fields (this one: {problem}); not a {what}")
    return CsvRows(header, header_line, rows, lines_read)


def _split_line(text: str) -> tuple[list[str] | None, str | None]:
    """(fields, None) of one physical line, or (None, why) when it is not one well-formed CSV record."""
    if "\0" in text:
        return None, "NUL byte in the line"
    try:
        return next(csv.reader((text,), strict=True)), None
    except csv.Error as err:
        return None, f"broken quoting: {err}" if '"' in text else f"not one CSV record: {err}"


class JsonObject(dict):
    """A JSON object that also keeps its (key, value) pairs in file order, duplicate keys included: `json`
    keeps only the last value of a key, which would drop an entry without a trace."""

    def __init__(self, pairs: list[tuple[str, object]]):
        super().__init__(pairs)
        self.pairs = pairs


def read_json(path: Path, what: str) -> object:
    """A label JSON file, objects as `JsonObject`; anything that is not UTF-8 JSON is a LabelFileError."""
    path = Path(path)
    data = read_label_bytes(path, what)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise LabelFileError(path, data[:err.start].count(b"\n") + 1, f"{_not_utf8(err)}; not a {what}") from None
    try:
        return json.loads(text, object_pairs_hook=JsonObject)
    except json.JSONDecodeError as err:
        raise LabelFileError(path, err.lineno, f"not JSON ({err.msg} at column {err.colno}); not a {what}") from None
    except RecursionError:
        raise LabelFileError(path, None, f"JSON nested too deeply; not a {what}") from None
