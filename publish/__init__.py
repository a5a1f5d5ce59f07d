"""Splits -> a folder laid out like a Hugging Face dataset repo -> the Hub.

`assign_splits` keeps every image's rows in one split; `write_release` writes the parquet shards with the
image bytes embedded and a dataset card computed from the written data; `upload_release` pushes the folder.
"""

from publish.card import render_card
from publish.hub import upload_release
from publish.release import RELEASE_FEATURES, write_release
from publish.split import SPLIT_COLUMNS, assign_splits

__all__ = ["RELEASE_FEATURES", "SPLIT_COLUMNS", "assign_splits", "render_card", "upload_release",
           "write_release"]
