"""Is a finished run's output usable? Two checks whose failure rejects the run (exit 1) instead of
publishing it as a success.

Per-plan rejections are expected and quarantined (a grounding failure here and there). But when an LLM
server is unreachable every plan ends `request_failed`, and when `image_dir` is wrong every image is
`missing_image`: the run "succeeds" with a release that is empty or full of holes. These functions say so
in one line, with the reason counts; the flow raises `kvqa.errors.RunRejected` with that line.
"""

from __future__ import annotations

from typing import Mapping


def _counts(by_reason: Mapping[str, int]) -> str:
    """`request_failed 100, ungrounded 5`: largest first, then by name, zeros left out."""
    items = sorted(((r, int(n)) for r, n in by_reason.items() if int(n)), key=lambda item: (-item[1], item[0]))
    return ", ".join(f"{r} {n:,}" for r, n in items)


def rejection_problem(plans: int, rejected_by_reason: Mapping[str, int], max_share: float, what: str = "plans",
                      stage: str | None = None) -> str | None:
    """One line when more than `max_share` of `plans` (`what`: plans, QA rows) were rejected, else None;
    `stage` names the stage when it is not generation.

    >>> rejection_problem(105, {"request_failed": 105}, 0.05)
    '105 of 105 plans rejected (100.0% > 5.0%): request_failed 105'
    >>> rejection_problem(20, {"request_failed": 19}, 0.05, "QA rows", "explain")
    'explain: 19 of 20 QA rows rejected (95.0% > 5.0%): request_failed 19'
    """
    rejected = sum(int(n) for n in rejected_by_reason.values())
    if plans <= 0 or rejected / plans <= max_share:
        return None
    return (f"{stage + ': ' if stage else ''}{rejected:,} of {plans:,} {what} rejected "
            f"({rejected / plans:.1%} > {max_share:.1%}): {_counts(rejected_by_reason)}")


def empty_release_problem(rows_by_split: Mapping[str, int],
                          quarantined_by_reason: Mapping[str, int] | None = None) -> str | None:
    """One line when the release has no rows in any split, else None; with the quarantine's reason counts
    (e.g. `images/missing_image 75`) when given, since they say where the rows went.

    >>> empty_release_problem({"train": 0, "test": 0}, {"images/missing_image": 75})
    'the release is empty (train 0, test 0 rows); quarantined: images/missing_image 75'
    """
    if sum(int(n) for n in rows_by_split.values()) > 0:
        return None
    splits = ", ".join(f"{s} {int(n):,}" for s, n in rows_by_split.items())
    why = _counts(quarantined_by_reason or {})
    return (f"the release is empty ({splits + ' rows' if splits else 'no splits'})"
            + (f"; quarantined: {why}" if why else ""))
