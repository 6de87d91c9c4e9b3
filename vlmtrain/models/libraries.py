"""The tower libraries, imported by the tower that uses them, so that a run imports what its config names.

open_clip's own `__init__` also imports timm and transformers, for its timm and Hugging Face towers:
about half of its import time. A command (`vlmtrain-train`, `-eval`, `-export`, a SLURM job's task) owns
its process, so it calls `import_only_what_is_named()`; from then on `open_clip()` imports open_clip without them, and a
tower that does need one of open_clip's adapters asks for it (`open_clip("timm")`), which brings that
adapter back. Elsewhere (a notebook importing vlmtrain and open_clip) open_clip is imported whole.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType

# The optional library -> the open_clip module that imports it up front (and works without it).
ADAPTERS = {"timm": "open_clip.timm_model", "transformers": "open_clip.hf_model"}
_only_what_is_named = False


def import_only_what_is_named() -> None:
    """From now on in this process, open_clip comes without timm and transformers unless asked for."""
    global _only_what_is_named
    _only_what_is_named = True


def open_clip(*needs: str) -> ModuleType:
    """The open_clip module, with the adapters for the libraries in `needs` ("timm", "transformers")
    usable."""
    unknown = set(needs) - set(ADAPTERS)
    if unknown:
        raise ValueError(f"open_clip has no adapter for {sorted(unknown)}")
    if "open_clip" not in sys.modules:
        _import_open_clip(left_out=set(ADAPTERS) - set(needs) if _only_what_is_named else set())
    for library in needs:
        adapter = sys.modules[ADAPTERS[library]]
        if getattr(adapter, library) is None and importlib.util.find_spec(library) is not None:
            importlib.reload(adapter)  # in place: open_clip's classes read the adapter's names at call time
    return sys.modules["open_clip"]


def _import_open_clip(left_out: set[str]) -> None:
    """Import open_clip with the libraries in `left_out` (those not imported yet) seen as not installed,
    as its adapters allow, then let them be imported again."""
    blocked = [name for name in left_out if name not in sys.modules]
    for name in blocked:
        sys.modules[name] = None  # type: ignore[assignment]  # `import name` raises ImportError
    try:
        importlib.import_module("open_clip")
    finally:
        for name in blocked:
            if sys.modules.get(name, ()) is None:
                del sys.modules[name]
