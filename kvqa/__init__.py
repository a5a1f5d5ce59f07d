"""Shared core of the kvqa pipeline: the config model, the question-class catalog, table IO.

The pipeline stages (`sources`, `generate`, `dedup`, `augment`, `publish`) are top-level packages that
import from here and never from `flows`.
"""
