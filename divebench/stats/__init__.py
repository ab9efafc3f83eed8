"""Gradient statistics for batch-size policies: Σ_i ||g_i||² and the gradient sum.

Where per-sample norms are computed: :mod:`divebench.stats.exact` (Opacus ghost norms,
one backward), :mod:`divebench.stats.bn` (BatchNorm per-sample terms, two definitions),
:mod:`divebench.stats.estimators` (no per-sample work). :mod:`divebench.stats.reference`
holds slow float64 references used by the tests. The loop talks to all of them through
:class:`divebench.stats.base.StatsProvider`.
"""

from __future__ import annotations

from typing import Any

from divebench.stats.base import StatsProvider

ESTIMATORS: tuple[str, ...] = ("exact", "epoch", "microbatch")

# The providers import Opacus (about 1.5 s, most of it its accountants' SciPy): loaded on
# first use, so a process that measures nothing (plain SGD, AdaBatch, a torchrun rank's
# start-up, the CLI's --help) does not pay for it.
_LAZY = {
    "BN_MODES": ("divebench.stats.bn", "BN_MODES"),
    "EpochEstimator": ("divebench.stats.estimators", "EpochEstimator"),
    "MicroBatchEstimator": ("divebench.stats.estimators", "MicroBatchEstimator"),
    "ExactProvider": ("divebench.stats.exact", "ExactProvider"),
    "unwrap": ("divebench.stats.exact", "unwrap"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'divebench.stats' has no attribute {name!r}")


def provider_from_options(options: Any, scope: str = "epoch") -> StatsProvider:
    """The provider for a policy's ``stats_options()``: missing keys take their defaults
    (``divebench.policy.STATS_OPTIONS``); anything else raises ``ValueError`` naming the
    key or value and what would be right. ``scope`` is the policy's ``stats_scope``:
    ``step`` needs the ``exact`` or ``microbatch`` estimator."""
    from divebench.policy import STATS_OPTIONS

    if not isinstance(options, dict):
        raise ValueError(f"stats_options() returned {type(options).__name__}; expected a dict with keys "
                         f"{sorted(STATS_OPTIONS)}")
    unknown = sorted(set(options) - set(STATS_OPTIONS))
    if unknown:
        raise ValueError(f"stats_options() has unknown key(s) {unknown}; the keys are {sorted(STATS_OPTIONS)}")
    merged = {**STATS_OPTIONS, **options}
    k = merged["micro_batches"]
    if not isinstance(k, int) or isinstance(k, bool) or k < 2:
        raise ValueError(f"stats_options() micro_batches={k!r}; expected an int >= 2")
    for key in ("estimator", "bn"):
        if not isinstance(merged[key], str):
            raise ValueError(f"stats_options() {key}={merged[key]!r}; expected a string")
    if scope == "step" and merged["estimator"] == "epoch":
        raise ValueError("stats_options() estimator='epoch' has no per-step statistics (its small "
                         "batches are the epoch's steps); a policy with stats_scope='step' needs "
                         "estimator 'exact' or 'microbatch'")
    return make_provider(merged["estimator"], merged["bn"], merged["micro_batches"])


def make_provider(
    estimator: str, bn: str = "contribution", micro_batches: int = 4
) -> StatsProvider:
    """Build the statistics provider a policy asked for.

    Args:
        estimator: ``exact`` (Opacus per-sample norms, the paper's definition),
            ``epoch`` (two-batch estimator over the epoch, no per-sample work) or
            ``microbatch`` (two-batch estimator within each batch).
        bn: BatchNorm definition for ``exact``: ``contribution`` or ``paper``
            (:mod:`divebench.stats.bn`); validated but unused by the estimators.
        micro_batches: k for ``microbatch`` (>= 2).
    """
    from divebench.stats.bn import BN_MODES
    from divebench.stats.estimators import EpochEstimator, MicroBatchEstimator
    from divebench.stats.exact import ExactProvider

    if bn not in BN_MODES:
        raise ValueError(f"bn={bn!r} is not a BatchNorm mode; expected one of {BN_MODES}")
    if estimator == "exact":
        return ExactProvider(bn=bn)
    if estimator == "epoch":
        return EpochEstimator()
    if estimator == "microbatch":
        return MicroBatchEstimator(micro_batches=micro_batches)
    raise ValueError(
        f"estimator={estimator!r} is not a statistics estimator; expected one of {ESTIMATORS}"
    )


__all__ = [
    "BN_MODES",
    "ESTIMATORS",
    "EpochEstimator",
    "ExactProvider",
    "MicroBatchEstimator",
    "StatsProvider",
    "make_provider",
    "provider_from_options",
    "unwrap",
]
