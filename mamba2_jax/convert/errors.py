"""Errors raised while reading or writing checkpoints."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or inconsistent.

    The message always names the file, and the tensor key when one is involved.
    """
