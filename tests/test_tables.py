"""Table files are byte-identical for the same rows, however the frame was put together."""

from __future__ import annotations

import pandas as pd

from kvqa.tables import write_table


def test_same_rows_from_other_chunks_write_the_same_bytes(tmp_path):
    """pandas' arrow-backed strings keep the chunks of concatenated frames (the augment stage joins one
    frame per chunk of images, and the Dask runner cuts other chunks than the local pool)."""
    rows = [{"recipe": '{"steps": [%d, %d]}' % (i % 97, i) * 20, "variant": i % 10} for i in range(4000)]
    whole = pd.DataFrame(rows)
    for size in (8, 13):
        pieces = pd.concat([pd.DataFrame(rows[i:i + size]) for i in range(0, len(rows), size)], ignore_index=True)
        assert pieces.equals(whole)
        write_table(whole, tmp_path / "whole.parquet")
        write_table(pieces, tmp_path / f"pieces-{size}.parquet")
        assert (tmp_path / f"pieces-{size}.parquet").read_bytes() == (tmp_path / "whole.parquet").read_bytes()
