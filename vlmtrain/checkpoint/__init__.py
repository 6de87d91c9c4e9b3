"""Checkpoints: saving and resuming a run (manager), reading one (load), exporting it (export)."""

# vlmtrain-export --format's choices, here so that the command's --help needs no torch
FORMATS = ("auto", "open_clip", "vlmtrain")
