"""The report's plots, as PNG bytes (matplotlib, Agg, no display).

PNG rather than SVG: matplotlib's SVG carries random element ids unless salted, and its PNG metadata is
removed here, so the same figures give the same bytes on every run with the same library versions.
"""

from __future__ import annotations

import io
from functools import cache

import numpy as np

OURS, REFERENCE = "#2b6cb0", "#c05621"


@cache
def _pyplot():
    """matplotlib.pyplot on Agg, imported at the first plot: importing it costs every `kvqa` command half a
    second, and only the report stage draws."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.spines.top": False, "axes.spines.right": False,
                         "svg.hashsalt": "kvqa"})
    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, bbox_inches="tight", metadata={"Software": None})
    _pyplot().close(fig)
    return buf.getvalue()


def share_bars(labels: list[str], ours: list[float], reference: list[float | None], title: str,
               reference_name: str) -> bytes:
    """Horizontal bars: our share of rows and the reference's, per label (a missing reference is blank)."""
    y = np.arange(len(labels))
    fig, ax = _pyplot().subplots(figsize=(7.5, 0.28 * len(labels) + 1.2))
    ax.barh(y - 0.2, ours, 0.4, color=OURS, label="this release")
    ax.barh(y + 0.2, [r if r is not None else 0 for r in reference], 0.4, color=REFERENCE, label=reference_name)
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    ax.set_xlabel("share of rows")
    ax.set_title(title)
    ax.legend(loc="lower right")
    return _png(fig)


def relative_difference_bars(labels: list[str], differences: list[float], title: str) -> bytes:
    """Horizontal bars of ours / reference - 1, per label: right of 0 = over-represented."""
    y = np.arange(len(labels))
    fig, ax = _pyplot().subplots(figsize=(7.5, 0.28 * len(labels) + 1.2))
    ax.barh(y, differences, color=[OURS if d >= 0 else REFERENCE for d in differences])
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    ax.set_xlabel("relative difference of the share (this release / reference - 1)")
    ax.set_title(title)
    return _png(fig)


def length_histograms(question_words: dict[int, list[int]], answer_words: dict[int, list[int]]) -> bytes:
    """Question and answer lengths in words, one step histogram per complexity level."""
    fig, axes = _pyplot().subplots(1, 2, figsize=(9, 3.2))
    for ax, data, what in ((axes[0], question_words, "question"), (axes[1], answer_words, "answer")):
        values = [v for vs in data.values() for v in vs]
        bins = np.arange(0, (max(values) if values else 1) + 2) - 0.5
        for level, vs in sorted(data.items()):
            ax.hist(vs, bins=bins, histtype="step", linewidth=1.4, label=f"level {level}")
        ax.set_xlabel(f"{what} length (words)")
        ax.set_ylabel("rows")
        ax.set_title(f"{what} lengths")
        if data:
            ax.legend()
    return _png(fig)


def count_bars(labels: list[str], values: list[float], xlabel: str, title: str, color: str = OURS) -> bytes:
    y = np.arange(len(labels))
    fig, ax = _pyplot().subplots(figsize=(7.5, 0.28 * max(len(labels), 1) + 1.2))
    ax.barh(y, values, color=color)
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    for yi, v in zip(y, values):
        ax.text(v, yi, f" {v:g}", va="center", fontsize=8)
    return _png(fig)


def histogram_bars(bins: list[str], counts: list[int], xlabel: str, title: str) -> bytes:
    """A histogram given as (bin label, count) pairs, e.g. the dedup stage's similarity histogram."""
    fig, ax = _pyplot().subplots(figsize=(8, 3))
    x = np.arange(len(bins))
    ax.bar(x, counts, color=OURS)
    ax.set_xticks(x, bins, rotation=60, ha="right")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.set_title(title)
    return _png(fig)


def error_rate_plot(labels: list[str], rates: list[float], lows: list[float], highs: list[float]) -> bytes:
    """Sampled error rate per class with its 95 % Wilson interval."""
    y = np.arange(len(labels))
    fig, ax = _pyplot().subplots(figsize=(7.5, 0.3 * len(labels) + 1.2))
    rates_arr = np.array(rates)
    ax.errorbar(rates_arr, y, xerr=[rates_arr - np.array(lows), np.array(highs) - rates_arr], fmt="o",
                color=OURS, ecolor="#555", capsize=3)
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("sampled error rate (wrong / (ok + wrong)), 95 % Wilson interval")
    ax.set_title("Expert review")
    return _png(fig)
