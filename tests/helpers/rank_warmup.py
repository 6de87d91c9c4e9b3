"""Imported once by the ranks' fork server (tests/helpers/ranks.py), last: it builds what nearly every
rank would build again, for each forked rank to inherit, then freezes the server's objects.

- The text tokenizers of the ranks' models: SMALL_MODEL's context length, and the sharded tests' 16
  (about 0.1 CPU s each per rank).
- Frozen, the half million objects the imports made are never scanned by a rank's garbage collection:
  the full collection a Trainer runs as it starts training took a quarter of a CPU second per rank, and
  wrote to every page of the inherited heap (copying it from the server).
"""

import gc

from tests.helpers.runs import SMALL_MODEL
from vlmtrain.models.text_encoders import open_clip_tokenizer

SMALL_CONTEXT = int(
    next(o for o in SMALL_MODEL if o.startswith("model.text_encoder.context_length=")).split("=")[1]
)
for context_length in (SMALL_CONTEXT, 16):
    open_clip_tokenizer(context_length)
gc.freeze()
