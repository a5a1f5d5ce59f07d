"""The run's quality report (`report.html`): the release against the Kvasir-VQA-x1 reference, lengths,
phrasings, quarantine, dedup and leakage, the augmented track, examples per class, expert review.

A stage package like the others (it never imports `flows`); the build flow runs it as the cached stage
`report`, last.
"""

from report.page import FILES_DIR, PAGE, REPORT_INPUTS, drawn_parameter_ranges, write_quality_report
from report.reference import Reference, compare_shares, load_reference

__all__ = ["FILES_DIR", "PAGE", "REPORT_INPUTS", "Reference", "compare_shares", "drawn_parameter_ranges",
           "load_reference", "write_quality_report"]
