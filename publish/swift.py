"""ms-swift JSONL, what the Medico notebooks train on: one line per pair, for both tracks.

    {"messages": [{"role": "user", "content": "<image>QUESTION"},
                  {"role": "assistant", "content": "ANSWER"}], "images": ["/abs/path/img.jpg"]}

Image paths are absolute (ms-swift resolves relative paths against its working directory, not the file),
so the files are for training on the machine that built the run; the parquet release is the portable form.
Lines follow the release's row order, so the files are identical across runs of the same config.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from kvqa.tables import atomic_path


def swift_line(question: str, answer: str, image_path: str) -> str:
    return json.dumps({"messages": [{"role": "user", "content": f"<image>{question}"},
                                    {"role": "assistant", "content": answer}],
                       "images": [image_path]}, ensure_ascii=False)


def write_swift_jsonl(rows: pd.DataFrame, out_dir: Path, track: str) -> dict[str, int]:
    """Write `out_dir/{track}-{split}.jsonl` for each split of `rows`; return {file name: lines}."""
    written = {}
    for split, part in rows.groupby("split", sort=True):
        name = f"{track}-{split}.jsonl"
        with atomic_path(Path(out_dir) / name) as tmp, open(tmp, "w", encoding="utf-8") as f:
            for q, a, p in zip(part["question"], part["answer"], part["path"]):
                f.write(swift_line(q, a, str(Path(p).resolve())) + "\n")
        written[name] = len(part)
    return written
