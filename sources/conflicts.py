"""Cross-class label conflicts: labels of one image that cannot all be true, found and quarantined here.

Source labels disagree across classes (an image whose abnormality is Barrett's oesophagus but which has a
polyp type and size; a polyp count of zero with a polyp size). A plan that combined both would get an
answer naming a polyp and an abnormality list without one, which the grounding check rejects at best and
publishes at worst. So the conflict is settled at the source stage: the catalog's `conflicts:` rules
(data, `kvqa.catalog.ConflictRule`) are applied to every image's facts, and when a rule fires the facts of
the classes it involves on that image are quarantined with reason `label_conflict` and the rule named.

The quarantine counts label units (CSV lines, boxes), and `rows_read = units in facts + quarantined`
must stay exact, so the units, not the facts, decide what leaves: a conflicting fact's units are
quarantined, and with them every other fact that those units feed (a HyperKvasir label row feeds several
classes; a box feeds count, location and size). A unit is then in the quarantine once and in no fact.
Kvasir-VQA rows each feed one fact, so there only the conflicting facts go.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import pandas as pd

from kvqa.catalog import Catalog, ConflictRule
from kvqa.tables import quarantine_frame
from sources.common import ParsedSource

STAGE = "sources"
REASON = "label_conflict"


@dataclass
class CheckedSources(ParsedSource):
    """Parsed sources after the conflict rules: `label_conflicts` is, per catalog rule (every rule, in
    catalog order), the number of images it fired on."""

    label_conflicts: dict[str, int] = field(default_factory=dict)


def fired_rules(catalog: Catalog, values_by_class: Mapping[str, Sequence[str]]) -> list[tuple[ConflictRule, list[str]]]:
    """The rules that fire on one image's facts ({class: values}), each with the classes it involves there:
    the `when` class and the classes of the `conflicts_with` conditions that hold."""
    fired = []
    for rule in catalog.conflicts.values():
        when = rule.when
        if when.question_class not in values_by_class or not when.holds(values_by_class[when.question_class]):
            continue
        against = [c.question_class for c in rule.conflicts_with
                   if c.question_class in values_by_class and c.holds(values_by_class[c.question_class])]
        if against:
            fired.append((rule, [when.question_class, *against]))
    return fired


def unit_key(source_file: str, img_id: str, unit: int) -> str:
    """The quarantine key of a label unit, as the readers write it: a CSV line, or a box of a JSON file."""
    return f"line {unit}" if source_file.lower().endswith(".csv") else f"{source_file}:{img_id}#{unit}"


def quarantine_label_conflicts(parsed: ParsedSource, catalog: Catalog) -> CheckedSources:
    """Apply the catalog's conflict rules to every image; move the conflicting facts' units (and every fact
    they feed) from the facts to the quarantine. Deterministic: images and units in sorted order."""
    facts = parsed.facts.reset_index(drop=True)
    counts = {name: 0 for name in catalog.conflicts}
    # fact row -> (rule, the fact rows it conflicts with under that rule) for every rule that flagged it
    flagged: dict[int, list[tuple[str, list[int]]]] = defaultdict(list)
    rules_of: dict[tuple[str, str], list[str]] = defaultdict(list)  # image -> the rules that fired on it
    for (source, img_id), rows in sorted(facts.groupby(["source", "img_id"], sort=False).indices.items()):
        by_class = {facts.at[i, "question_class"]: int(i) for i in rows}
        for rule, classes in fired_rules(catalog, {c: list(facts.at[i, "values"]) for c, i in by_class.items()}):
            counts[rule.name] += 1
            rules_of[(source, img_id)].append(rule.name)
            when, *against = (by_class[c] for c in classes)
            flagged[when].append((rule.name, against))
            for i in against:
                flagged[i].append((rule.name, [when]))
    if not flagged:
        return CheckedSources(facts=facts, quarantine=parsed.quarantine, rows_read=parsed.rows_read,
                              label_conflicts=counts)

    dropped = _with_shared_units(facts, set(flagged))
    by_unit: dict[tuple[str, str, str, int], list[int]] = defaultdict(list)
    for i in sorted(dropped):
        for u in facts.at[i, "source_rows"]:
            by_unit[(facts.at[i, "source"], facts.at[i, "source_file"], facts.at[i, "img_id"], int(u))].append(i)
    rows = [{"stage": STAGE, "source": source, "key": unit_key(source_file, img_id, unit), "reason": REASON,
             "detail": _detail(facts, fact_rows, flagged, rules_of[(source, img_id)]),
             "raw": json.dumps([_fact_record(facts, i) for i in fact_rows], ensure_ascii=False)}
            for (source, source_file, img_id, unit), fact_rows in sorted(by_unit.items())]
    kept = facts.drop(index=sorted(dropped)).reset_index(drop=True)
    quarantine = pd.concat([parsed.quarantine, quarantine_frame(rows)], ignore_index=True)
    return CheckedSources(facts=kept, quarantine=quarantine, rows_read=parsed.rows_read, label_conflicts=counts)


def _with_shared_units(facts: pd.DataFrame, rows: set[int]) -> set[int]:
    """The flagged facts plus every fact of the same image that shares a unit with one, transitively."""
    images = {(facts.at[i, "source"], facts.at[i, "img_id"]) for i in rows}
    same_image = [i for i, key in enumerate(zip(facts["source"], facts["img_id"])) if key in images]
    units = {i: {(facts.at[i, "source_file"], int(u)) for u in facts.at[i, "source_rows"]} for i in same_image}
    out = set(rows)
    while True:
        taken = set().union(*(units[i] for i in out))
        grown = out | {i for i in same_image if units[i] & taken}
        if grown == out:
            return out
        out = grown


def _fact_record(facts: pd.DataFrame, i: int) -> dict:
    return {"img_id": facts.at[i, "img_id"], "question_class": facts.at[i, "question_class"],
            "values": list(facts.at[i, "values"]), "source_question": facts.at[i, "source_question"],
            "source_answer": facts.at[i, "source_answer"]}


def _stated(facts: pd.DataFrame, i: int) -> str:
    return f"{facts.at[i, 'question_class']}={list(facts.at[i, 'values'])}"


def _detail(facts: pd.DataFrame, fact_rows: list[int], flagged: dict[int, list[tuple[str, list[int]]]],
            rules: list[str]) -> str:
    """'<rules>: <class>=<values> conflicts with <class>=<values>, ...' for the facts of one unit; a fact
    taken along only because it shares the unit is named as such."""
    parts = []
    for i in sorted(fact_rows, key=lambda i: i not in flagged):
        if i in flagged:
            peers = sorted({j for _, js in flagged[i] for j in js})
            parts.append(f"{_stated(facts, i)} conflicts with {', '.join(_stated(facts, j) for j in peers)}")
        else:
            parts.append(f"{_stated(facts, i)} goes with its label unit")
    return f"{', '.join(rules)}: {'; '.join(parts)}"
