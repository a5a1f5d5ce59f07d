"""Upload a release folder to the Hugging Face Hub with `huggingface_hub`.

The token comes from the environment (`HF_TOKEN`) and is handed to the client only: it is never logged,
printed, or written into the folder or the run report.
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import HfApi


class MissingTokenError(RuntimeError):
    pass


def upload_release(folder: Path, repo_id: str, *, private: bool = False, endpoint: str | None = None,
                   commit_message: str = "kvqa release") -> str:
    """Create the dataset repo if needed and upload the folder as one commit; return the commit URL."""
    folder = Path(folder)
    if not (folder / "README.md").is_file() or not (folder / "data").is_dir():
        raise FileNotFoundError(f"{folder} is not a release folder (README.md and data/ expected)")
    token = os.environ.get("HF_TOKEN")
    if not token:
        raise MissingTokenError("set HF_TOKEN to a Hugging Face token with write access to publish")
    api = HfApi(endpoint=endpoint, token=token)
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="dataset",
                             commit_message=commit_message,
                             allow_patterns=["README.md", "data/*.parquet", "augmented/*.parquet"])
    return str(info)
