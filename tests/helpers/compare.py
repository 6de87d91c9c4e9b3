"""Bit-for-bit comparison of saved and restored state, for the resume tests."""

from __future__ import annotations

import torch


def bit_equal(a: object, b: object) -> bool:
    """Equal to the bit: tensors by value and dtype, containers item by item (lists and tuples alike)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(bit_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(map(bit_equal, a, b))
    return a == b
