"""Pieces shared by the built-in policies."""

from __future__ import annotations

import math
from typing import Literal

LrScaling = Literal["none", "linear", "sqrt"]


def lr_scale(scaling: str, batch_size: int, initial_batch_size: int) -> float:
    """LR multiplier for a batch grown from ``initial_batch_size`` to ``batch_size``:
    none = 1 (the base schedule untouched; the variant whose numbers match the DiveBatch
    abstract), linear = B/B0, sqrt = sqrt(B/B0)."""
    ratio = batch_size / initial_batch_size
    if scaling == "linear":
        return ratio
    if scaling == "sqrt":
        return math.sqrt(ratio)
    return 1.0


def check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name}={value} is not valid: expected a number > 0")


def resolve_max(own: int, ctx_max: int, initial: int, policy: str) -> int:
    """A policy's B_max: its own key when set (> 0), else the suite's ``max_batch_size``."""
    if own < 0:
        raise ValueError(f"{policy}.max_batch_size={own} is not valid: expected >= 1 (or 0 for the suite's)")
    bmax = own or ctx_max
    if bmax < initial:
        raise ValueError(f"{policy}.max_batch_size={bmax} is smaller than batch_size={initial}: B_max must be >= B0")
    return bmax
