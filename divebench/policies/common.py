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


def check_finite_positive(name: str, value: float) -> None:
    """:func:`check_positive`, and finite (a rule constant such as δ or θ)."""
    check_positive(name, value)
    if not math.isfinite(value):
        raise ValueError(f"{name}={value} is not valid: expected a finite number > 0")


def resolve_max(own: int, ctx_max: int, initial: int, policy: str) -> int:
    """A policy's B_max: its own key when set (> 0), else the suite's ``max_batch_size``."""
    if own < 0:
        raise ValueError(f"{policy}.max_batch_size={own} is not valid: expected >= 1 (or 0 for the suite's)")
    bmax = own or ctx_max
    if bmax < initial:
        raise ValueError(f"{policy}.max_batch_size={bmax} is smaller than batch_size={initial}: B_max must be >= B0")
    return bmax


AdaptiveLrScaling = Literal["none", "linear", "sqrt", "adascale"]


def noise_and_signal(sum_sq_norms: float, grad_sum_sq_norm: float, n: int) -> tuple[float, float]:
    """(tr Σ, ||G||²) from Σ_i ||g_i||² and ||Σ_i g_i||² over n samples, both unbiased:
    tr Σ = (Σ_i ||g_i||² − ||Σ_i g_i||²/n)/(n − 1), ||G||² = ||Σ_i g_i||²/n² − tr Σ/n
    (the same estimators as :class:`divebench.policy.StepStats`; NaN for n < 2)."""
    if n < 2:
        return math.nan, math.nan
    trace = (sum_sq_norms - grad_sum_sq_norm / n) / (n - 1)
    return trace, grad_sum_sq_norm / (n * n) - trace / n


def adascale_gain(trace_cov: float, grad_sq: float, batch_size: int, initial_batch_size: int) -> float:
    """AdaScale's gain ratio (Johnson, Agrawal, Gu, Guestrin 2020, eq. 4) for a batch
    S = B/B0 times the base batch B0:

        r = (σ² + μ²) / (σ²/S + μ²),  σ² = tr Σ / B0 (a base batch's gradient variance),
                                       μ² = ||G||²,

    clipped to [1, S] (where the estimates are noisy or ||G||² ≤ 0, r = S: the linear
    rule; NaN estimates give r = 1). The LR multiplier is r."""
    scale = batch_size / initial_batch_size
    if scale <= 1 or not (math.isfinite(trace_cov) and math.isfinite(grad_sq)):
        return 1.0
    sigma2 = max(trace_cov, 0.0) / initial_batch_size
    mu2 = grad_sq
    if mu2 <= 0:
        return scale
    return min(max((sigma2 + mu2) / (sigma2 / scale + mu2), 1.0), scale)
