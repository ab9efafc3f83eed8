"""Gradient statistics for batch-size policies: Σ_i ||g_i||² and the gradient sum.

Where per-sample norms are computed: :mod:`divebench.stats.exact` (Opacus ghost norms,
one backward), :mod:`divebench.stats.bn` (BatchNorm per-sample terms, two definitions),
:mod:`divebench.stats.estimators` (no per-sample work). :mod:`divebench.stats.reference`
holds slow float64 references used by the tests. The loop talks to all of them through
:class:`divebench.stats.base.StatsProvider`.
"""

from __future__ import annotations

from divebench.stats.base import StatsProvider
from divebench.stats.bn import BN_MODES
from divebench.stats.estimators import EpochEstimator, MicroBatchEstimator
from divebench.stats.exact import ExactProvider, unwrap

ESTIMATORS: tuple[str, ...] = ("exact", "epoch", "microbatch")


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
    "unwrap",
]
