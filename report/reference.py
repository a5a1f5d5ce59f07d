"""The reference distribution a release is compared with: the published Kvasir-VQA-x1 counts.

The counts are data (`kvasir_vqa_x1_reference.yaml`, its source named in the file), not code. A release
row counts once per class it holds, as in the reference; shares are compared, not counts, since a
release from the embedded sample or another label set has another size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

REFERENCE_PATH = Path(__file__).with_name("kvasir_vqa_x1_reference.yaml")


@dataclass(frozen=True)
class Reference:
    name: str
    source: str
    rows: int
    complexity: dict[int, int]
    question_class: dict[str, int]


def load_reference(path: Path = REFERENCE_PATH) -> Reference:
    data = yaml.safe_load(Path(path).read_text())
    return Reference(name=data["name"], source=data["source"], rows=int(data["rows"]),
                     complexity={int(k): int(v) for k, v in data["complexity"].items()},
                     question_class={str(k): int(v) for k, v in data["question_class"].items()})


def compare_shares(ours: dict, total: int, reference: dict, reference_total: int) -> list[dict]:
    """Per key (complexity level or class): our rows and share of rows, the reference's, and the relative
    difference of the shares (ours / reference - 1; None for a key the reference does not have).
    Reference keys first, in the reference's order, then ours that it lacks, by rows."""
    keys = list(reference) + sorted((k for k in ours if k not in reference), key=lambda k: (-ours[k], str(k)))
    out = []
    for k in keys:
        n = int(ours.get(k, 0))
        share = n / total if total else 0.0
        ref_n = reference.get(k)
        ref_share = ref_n / reference_total if ref_n is not None else None
        out.append({"key": k, "rows": n, "share": share, "reference_rows": ref_n, "reference_share": ref_share,
                    "relative_difference": (share / ref_share - 1) if ref_share else None})
    return out
