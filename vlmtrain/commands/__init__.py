"""What answers at once: the after-the-run commands (vlmtrain-runs, vlmtrain-plot) and the Hydra apps'
--help, each a module that imports neither torch nor open_clip. The Hydra apps are in vlmtrain.cli."""

from __future__ import annotations

import sys
from typing import NoReturn


def fail(error: Exception | str, code: int = 2) -> NoReturn:
    """A problem the user can fix: one line on stderr, and exit code 2."""
    print(f"error: {error}", file=sys.stderr)
    sys.exit(code)
