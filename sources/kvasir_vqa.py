"""Kvasir-VQA metadata CSV (`source,question,answer,img_id`) -> atomic facts.

The real file's quirks are handled here, not downstream: the misspelt "instrumnets" question, multi-values
joined by `"; "` or `";"` in any order, typos such as `lower-rigth` and `>20` (mapped by the catalog's
synonyms), the `none` rows with an empty answer, the subjective "Is this finding easy to detect?" that the
release dropped, and images whose polyps were labelled on several rows (merged into one fact).

"Source" means a configured label source in this project (`sources:` in the config, the `source` column of
every table). The file's own `source` column is something else: the image's category (Polyps, Esophagitis,
Instrument, Normal, Ulcerative Colitis in the real file). Its header stays as the file has it
(`REQUIRED_HEADER`); in the code it is the row's `category`, and a fact stores it as `source_label` (the
source's own label for the image). Answers, synonyms and empty questions are compared in one form,
`kvqa.text.normalise_text`.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from kvqa.catalog import MULTI_VALUED, AnswerType, Catalog, QuestionClass
from kvqa.config import KvasirVQASource
from kvqa.tables import stable_hash
from kvqa.text import normalise_text
from sources.common import ParsedSource, Quarantine, bad_id, csv_rows, order_facts

REQUIRED_HEADER = ("source", "question", "answer", "img_id")
COUNT_RE = re.compile(r"^\d{1,3}$")


class AnswerError(ValueError):
    """An atomic answer that cannot be mapped onto its class's vocabulary."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


@dataclass
class _Candidate:
    line: int
    category: str  # the file's `source` column
    question: str
    answer: str
    values: tuple[str, ...]
    raw: dict = field(repr=False)


def parse_answer(qc: QuestionClass, answer: str, separator: str = ";") -> tuple[str, ...]:
    """Canonical values of one atomic answer, in vocabulary order; raises AnswerError with a reason."""
    parts = [normalise_text(p) for p in answer.split(separator)]
    parts = [p for p in parts if p]
    if not parts:
        raise AnswerError("empty_answer", "the answer is empty")
    if qc.answer_type == AnswerType.count:
        if len(parts) != 1 or not COUNT_RE.match(parts[0]):
            raise AnswerError("bad_count", f"{answer!r} is not a non-negative integer")
        return (str(int(parts[0])),)
    unknown = [p for p in parts if p not in qc.lookup]
    if unknown:
        raise AnswerError("unknown_value", f"{unknown} not in the vocabulary of {qc.name}")
    values = sorted({qc.lookup[p] for p in parts}, key=qc.sort_key)
    if qc.answer_type not in MULTI_VALUED and len(values) != 1:
        raise AnswerError("too_many_values", f"{qc.name} takes one value, got {values}")
    if "none" in values and len(values) > 1:
        raise AnswerError("contradictory_values", f"'none' together with {values}")
    return tuple(values)


def _merge(qc: QuestionClass, cands: list[_Candidate]) -> tuple[tuple[str, ...] | None, str]:
    """Merge several rows of one (img_id, class): a union for multi-valued classes, else they must agree.

    Kvasir-VQA lists one row per polyp for some images ("paris ip" and "paris is" on two rows), so a union
    is the faithful reading; two different counts or yes/no answers are a contradiction.
    """
    distinct = sorted({c.values for c in cands})
    if len(distinct) == 1:
        return distinct[0], ""
    if qc.answer_type in MULTI_VALUED:
        union = sorted({v for vals in distinct for v in vals}, key=qc.sort_key)
        if "none" not in union:
            return tuple(union), ""
    return None, f"rows disagree: {[list(d) for d in distinct]}"


def parse_kvasir_vqa_metadata(src: KvasirVQASource, catalog: Catalog) -> ParsedSource:
    """Parse the metadata CSV into facts; every non-blank line after the header becomes part of a fact or a
    quarantine record (a file that cannot be read at all is a LabelFileError)."""
    path = Path(src.metadata_csv)
    quarantine = Quarantine(src.name)
    candidates: dict[tuple[str, str], list[_Candidate]] = defaultdict(list)
    categories_by_image: dict[str, Counter] = defaultdict(Counter)
    dropped = {q.strip() for q in catalog.dropped_questions}
    empty = {normalise_text(q) for q in catalog.empty_questions}

    def reject(line: int, reason: str, detail: str, raw: object) -> None:
        quarantine.reject(f"line {line}", reason, detail, raw)

    table = csv_rows(path, REQUIRED_HEADER, "Kvasir-VQA metadata CSV", quarantine)
    idx = {c: table.header.index(c) for c in REQUIRED_HEADER}
    for line, row in table.rows:
        rec = {c: row[i] for c, i in idx.items()}
        img_id, question, answer = rec["img_id"].strip(), rec["question"].strip(), rec["answer"]
        if why := bad_id(img_id):
            reject(line, "bad_id", why, rec)
        elif normalise_text(question) in empty:
            reject(line, "empty_question", "question is empty or 'none' (no atomic pair)", rec)
        elif question in dropped:
            reject(line, "dropped_question", "dropped from Kvasir-VQA-x1 (subjective)", rec)
        elif question not in catalog.class_by_question:
            reject(line, "unknown_question", f"no catalog class asks {question!r}", rec)
        else:
            qc = catalog.class_by_question[question]
            try:
                values = parse_answer(qc, answer, catalog.value_separator)
            except AnswerError as err:
                reject(line, err.reason, str(err), rec)
                continue
            category = rec["source"].strip()  # the file's `source` column is the image's category
            candidates[(img_id, qc.name)].append(_Candidate(line, category, question, answer, values, rec))
            categories_by_image[img_id][category] += 1

    facts: list[dict] = []
    for (img_id, cls), cands in candidates.items():
        qc = catalog.classes[cls]
        # An image has one category; rows that name another contradict the image's majority category.
        category = min(categories_by_image[img_id].items(), key=lambda kv: (-kv[1], kv[0]))[0]
        for c in [c for c in cands if c.category != category]:
            reject(c.line, "conflicting_source", f"row's category is {c.category!r}, the image's is {category!r}",
                   c.raw)
        cands = [c for c in cands if c.category == category]
        if not cands:
            continue
        values, why = _merge(qc, cands)
        if values is None:
            for c in cands:
                reject(c.line, "conflicting_answers", why, c.raw)
            continue
        answer = cands[0].answer.strip() if len(cands) == 1 else "; ".join(values)
        facts.append({
            "fact_id": stable_hash(src.name, img_id, cls)[:16], "source": src.name, "img_id": img_id,
            "source_label": category, "question_class": cls, "answer_type": str(qc.answer_type),
            "values": list(values), "source_question": cands[0].question, "source_answer": answer,
            "source_file": path.name, "source_rows": [c.line for c in cands], "boxes": [], "box_label": "",
        })
    qf = quarantine.frame()
    qf = qf.assign(_l=qf["key"].str.slice(5).astype(int)).sort_values("_l", kind="stable").drop(columns="_l")
    return ParsedSource(facts=order_facts(facts, catalog), quarantine=qf.reset_index(drop=True),
                        rows_read=table.lines_read)
