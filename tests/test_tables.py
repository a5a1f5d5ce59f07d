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


def test_a_table_written_in_pieces_has_the_same_bytes_however_it_was_cut(tmp_path):
    """`write_table_pieces` (the augment stage streams its table from the records batches): fixed row
    groups whatever the pieces, one row group gives `write_table`'s bytes, and empty pieces change nothing."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kvqa.tables import first_rows, write_table_pieces

    rows = [{"recipe": '{"steps": [%d, %d]}' % (i % 97, i) * 20, "variant": i % 10} for i in range(4000)]
    whole = pd.DataFrame(rows)
    table = pa.Table.from_pandas(whole, preserve_index=False)
    schema = table.schema
    write_table(whole, tmp_path / "whole.parquet")
    assert write_table_pieces([table.slice(i, 37) for i in range(0, 4000, 37)], tmp_path / "one.parquet", schema,
                              4000) == 4000
    assert (tmp_path / "one.parquet").read_bytes() == (tmp_path / "whole.parquet").read_bytes()
    for size in (8, 999):
        pieces = [table.slice(i, size) for i in range(0, 4000, size)] + [table.slice(0, 0)]
        write_table_pieces(pieces, tmp_path / f"cut-{size}.parquet", schema, 300)
    assert (tmp_path / "cut-8.parquet").read_bytes() == (tmp_path / "cut-999.parquet").read_bytes()
    meta = pq.ParquetFile(tmp_path / "cut-8.parquet").metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [300] * 13 + [100]
    assert pd.read_parquet(tmp_path / "cut-8.parquet").equals(whole)
    assert first_rows(tmp_path / "cut-8.parquet", 450).equals(whole.head(450))  # across a row group
    write_table_pieces([table.slice(0, 0)], tmp_path / "empty.parquet", schema, 300)
    write_table(whole.head(0), tmp_path / "empty-whole.parquet")
    assert (tmp_path / "empty.parquet").read_bytes() == (tmp_path / "empty-whole.parquet").read_bytes()
