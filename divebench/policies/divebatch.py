"""DiveBatch (Chen, Wang, Sundaram, arXiv 2509.16173): grow the batch size from the
measured gradient diversity Δ = Σ_i ||g_i||² / ||Σ_i g_i||², as its authors ran it.

- Windows of ``resize_freq`` epochs; the last epoch of each window is a measurement
  epoch while B < B_max (once B reaches B_max nothing is measured again), except the
  run's last epoch, whose statistic no decision would use.
- After a measurement epoch: Δ̂ NaN/Inf -> B = B_max; else
  B <- int(min(max(δ·n·Δ̂, B), B_max)): never decreases, truncated (no rounding to
  powers of two), no lower clamp.
- LR: ``lr_scaling`` none (default; the variant whose numbers match the abstract),
  linear (× B/B0, kept on top of the base schedule), sqrt, or adascale (× AdaScale's
  gain r from the last measured epoch's tr Σ and ||G||²,
  :func:`divebench.policies.common.adascale_gain`; the epoch's sums are taken along the
  trajectory, see divebench.stats).
- Statistics: ``estimator`` exact (Opacus per-sample norms, the paper's definition),
  epoch or microbatch (no per-sample gradients; see divebench.stats); ``bn`` contribution
  (default) or paper (the authors' BN-in-eval-mode backward).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from divebench.policies.common import (
    AdaptiveLrScaling,
    adascale_gain,
    check_finite_positive,
    lr_scale,
    noise_and_signal,
    resolve_max,
)
from divebench.policy import Decision, Policy, PolicyConfig, PolicyState, SuiteContext


@dataclass
class DiveBatchConfig(PolicyConfig):
    delta: float = 0.1  # δ: target batch size = δ·n·Δ̂
    resize_freq: int = 20  # epochs per window; the window's last epoch is measured
    max_batch_size: int = 0  # 0 = the suite's max_batch_size
    lr_scaling: AdaptiveLrScaling = "none"
    estimator: Literal["exact", "epoch", "microbatch"] = "exact"
    bn: Literal["contribution", "paper"] = "contribution"
    micro_batches: int = 4  # estimator=microbatch: micro-batches per logical batch

    def validate(self, ctx: SuiteContext) -> None:
        check_finite_positive("divebatch.delta", self.delta)
        if self.resize_freq < 1:
            raise ValueError(f"divebatch.resize_freq={self.resize_freq} is not valid: expected an int >= 1")
        if self.micro_batches < 2:
            raise ValueError(f"divebatch.micro_batches={self.micro_batches} is not valid: expected an int >= 2")
        resolve_max(self.max_batch_size, ctx.max_batch_size, ctx.initial_batch_size, "divebatch")


def divebatch_rule(batch_size: int, n_diversity: float, delta: float, b_max: int) -> int:
    """The authors' update: B <- int(min(max(δ·n·Δ̂, B), B_max)); NaN/Inf -> B_max."""
    if not math.isfinite(n_diversity):
        return b_max
    return int(min(max(delta * n_diversity, batch_size), b_max))


class DiveBatch(Policy):
    name = "divebatch"
    description = "DiveBatch: grow the batch from the measured gradient diversity (arXiv 2509.16173)"
    config_class = DiveBatchConfig
    stats = "per_sample_sq_norms"

    def __init__(self, config: DiveBatchConfig, ctx: SuiteContext) -> None:  # type: ignore[override]
        super().__init__(config, ctx)
        self.cfg = config
        self.b_max = resolve_max(config.max_batch_size, ctx.max_batch_size, ctx.initial_batch_size, "divebatch")
        self.batch_size = ctx.initial_batch_size
        self.applied_epochs: list[int] = []  # epochs whose statistics were applied
        self.trace_cov = math.nan  # tr Σ and ||G||² of the last measurement (lr_scaling=adascale)
        self.grad_sq = math.nan

    def decide_epoch(self, state: PolicyState) -> Decision:
        # Apply the last epoch's measurement (it arrives with the next decision).
        if state.stats is not None and state.epoch not in self.applied_epochs:
            self.batch_size = divebatch_rule(self.batch_size, state.stats.n_diversity, self.cfg.delta, self.b_max)
            self.applied_epochs.append(state.epoch)
            self.trace_cov, self.grad_sq = noise_and_signal(
                state.stats.sum_sq_norms, state.stats.grad_sum_sq_norm, state.stats.n_samples)
        # the run's last epoch is not measured: no decision would ever use its statistic
        measure = ((state.epoch + 1) % self.cfg.resize_freq == 0 and self.batch_size < self.b_max
                   and state.epoch + 1 < self.ctx.epochs)
        if self.cfg.lr_scaling == "adascale":
            mult = adascale_gain(self.trace_cov, self.grad_sq, self.batch_size, self.ctx.initial_batch_size)
        else:
            mult = lr_scale(self.cfg.lr_scaling, self.batch_size, self.ctx.initial_batch_size)
        return Decision(self.batch_size, mult, measure)

    def stats_options(self) -> dict[str, Any]:
        return {"estimator": self.cfg.estimator, "bn": self.cfg.bn, "micro_batches": self.cfg.micro_batches}

    def state_dict(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "applied_epochs": list(self.applied_epochs),
                "trace_cov": self.trace_cov, "grad_sq": self.grad_sq}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batch_size = int(state["batch_size"])
        self.applied_epochs = [int(e) for e in state["applied_epochs"]]
        self.trace_cov = float(state.get("trace_cov", math.nan))
        self.grad_sq = float(state.get("grad_sq", math.nan))
