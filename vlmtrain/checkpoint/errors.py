"""What can go wrong with a checkpoint, as the commands report it: importable without torch, so that a
command's help and its error handling start at once."""

from __future__ import annotations


class UnsafeCheckpoint(ValueError):
    """A file that would need more than tensors and plain values to load (it could run code)."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (e.g. a full disk); the message names the one still intact."""
