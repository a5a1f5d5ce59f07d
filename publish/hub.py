"""Upload a release folder to the Hugging Face Hub with `huggingface_hub`: one commit that replaces the
previous release.

A publish must leave exactly the new release in the repo: a shard left over from an earlier release with
more shards still matches the card's `data/{split}-*` globs, and `load_dataset` would load its rows too.
So one `create_commit` holds an add for every file of the release and a delete for every remote file under
the folders a release owns (`data/`, `augmented/`, `explanations/`) that the new release does not have; files elsewhere
(`.gitattributes`, a hand-added LICENSE) are left alone. The commit names the revision the listing was
taken from as its parent, so a repo changed in between fails the commit instead of keeping a stale shard.

Why not `upload_folder` (huggingface_hub 2.4.0; `upload_large_folder` no longer exists): with `hf_xet`
installed it is a streamed pipeline that commits a large folder in several commits of ~256 files, its
`delete_patterns` riding the first one, so between commits the repo holds a partial release. `create_commit`
first uploads every file's content (LFS files through Xet, chunk-deduplicated, so a re-run after an
interruption transfers ~nothing again) and then writes a single commit; its limits, 25k LFS files and 1 GB
of inline (non-LFS) content, are far above a release of `max_shard_bytes` shards (~600 files for 300 GB
at the default 500 MiB).

The token comes from the environment (`HF_TOKEN`) and is handed to the client only: it is never logged,
printed, or written into the folder or the run report.
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

RELEASE_FILES = ("README.md", "data/*.parquet", "augmented/*.parquet",  # what a release folder publishes
                 "explanations/*.parquet")
RELEASE_FOLDERS = ("data/", "augmented/", "explanations/")  # remote folders that hold only the current release


class MissingTokenError(RuntimeError):
    pass


def release_files(folder: Path) -> list[str]:
    """The release's files, as repo paths, sorted."""
    return sorted({p.relative_to(folder).as_posix() for pattern in RELEASE_FILES for p in folder.glob(pattern)
                   if p.is_file()})


def stale_files(remote: list[str], new: list[str]) -> list[str]:
    """Remote files of an earlier release that the new one does not have (they would be loaded with it)."""
    keep = set(new)
    return sorted(f for f in remote if f.startswith(RELEASE_FOLDERS) and f not in keep)


def upload_release(folder: Path, repo_id: str, *, private: bool = False, endpoint: str | None = None,
                   commit_message: str = "kvqa release") -> str:
    """Create the dataset repo if needed and make it hold exactly this release, in one commit; return the
    commit URL."""
    folder = Path(folder)
    if not (folder / "README.md").is_file() or not (folder / "data").is_dir():
        raise FileNotFoundError(f"{folder} is not a release folder (README.md and data/ expected)")
    token = os.environ.get("HF_TOKEN")
    if not token:
        raise MissingTokenError("set HF_TOKEN to a Hugging Face token with write access to publish")
    api = HfApi(endpoint=endpoint, token=token)
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    head = api.repo_info(repo_id, repo_type="dataset").sha
    remote = api.list_repo_files(repo_id, repo_type="dataset", revision=head)
    files = release_files(folder)
    operations = [CommitOperationDelete(path_in_repo=f) for f in stale_files(remote, files)]
    operations += [CommitOperationAdd(path_in_repo=f, path_or_fileobj=folder / f) for f in files]
    info = api.create_commit(repo_id, operations, commit_message=commit_message, repo_type="dataset",
                             parent_commit=head)
    return str(info)
