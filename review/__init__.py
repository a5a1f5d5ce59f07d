"""Expert review of a built release: a stratified sample a clinician can judge without Python, and the
verdicts brought back into the run.

`export` draws the sample (class x complexity) and writes the review sheet (HTML page, CSV with `verdict`
and `comment` columns, Label Studio import JSON); `verdicts` reads a filled sheet (every problem as
`file:line: what`, nothing applied on any), records the verdicts in the run, turns `wrong` rows into
quarantine rows (`review/expert_rejected`) for the release stage, and states the sampled error rate per
class with a 95 % Wilson interval. A verdict holds for the text and image its reviewer read (`row_digest`):
once its row changes it is void, and the row is offered for review again.
"""

from review.export import SHEET_COLUMNS, reviewable_rows, stratified_sample, write_review_sheet
from review.verdicts import (VERDICTS, VERDICTS_FILE, ReviewSheetError, current_verdicts, error_rates, expert_rejected,
                             load_verdicts, merge_verdicts, read_filled_sheet, record_verdicts, row_digests,
                             wilson_interval)

__all__ = ["SHEET_COLUMNS", "VERDICTS", "VERDICTS_FILE", "ReviewSheetError", "current_verdicts", "error_rates",
           "expert_rejected", "load_verdicts", "merge_verdicts", "read_filled_sheet", "record_verdicts", "reviewable_rows", "row_digests",
           "stratified_sample", "wilson_interval", "write_review_sheet"]
