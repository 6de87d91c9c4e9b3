"""A config tree as flat dotted keys (`{"optim": {"lr": 1e-3}}` -> `{"optim.lr": 1e-3}`): what resume
policy compares and the runs table shows. Plain Python, so that `vlmtrain-runs` and `vlmtrain-plot` need
no config library."""

from __future__ import annotations

from typing import Any


def flatten(tree: Any, prefix: str = "", *, keep_empty: bool = True) -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values; an empty mapping is a value `{}`, or left out
    (`keep_empty=False`)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat |= flatten(value, f"{prefix}.{key}" if prefix else str(key), keep_empty=keep_empty)
    if not tree and prefix and keep_empty:
        flat[prefix] = {}
    return flat
