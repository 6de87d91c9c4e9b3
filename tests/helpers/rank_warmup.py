"""Imported once by the ranks' fork server (tests/helpers/ranks.py), last: it builds what nearly every
rank would build again, for each forked rank to inherit, then freezes the server's objects.

- The text tokenizers of the ranks' models, SMALL_MODEL's and TINY_TOWERS' (about 0.1 CPU s each per
  rank).
- Frozen, the half million objects the imports made are never scanned by a rank's garbage collection:
  the full collection a Trainer runs as it starts training took a quarter of a CPU second per rank, and
  wrote to every page of the inherited heap (copying it from the server).
"""

import gc

from tests.helpers.runs import SMALL_CONTEXT, TINY_CONTEXT
from vlmtrain.models.text_encoders import open_clip_tokenizer

for context_length in (SMALL_CONTEXT, TINY_CONTEXT):
    open_clip_tokenizer(context_length)
gc.freeze()
