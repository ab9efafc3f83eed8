"""Batch-size rules that decide from per-step gradient statistics (``stats_scope="step"``).

Each measured step hands the rule its batch's :class:`~divebench.policy.StepStats` at
that step's weights: Σ_{i∈B} ||g_i||², ||Σ_{i∈B} g_i||², B, and the unbiased estimates
tr Σ (per-sample gradient variance) and ||G||² (the squared norm of the expected
gradient) derived from them. A step is measured every ``interval`` steps (step indices
0, k, 2k, ...); the rule applies a measurement before the next step and pays nothing on
the steps it does not measure. The batch never shrinks; once it reaches B_max nothing
is measured again (unless ``lr_scaling=adascale``, which keeps measuring for its gain).

- ``gns`` (McCandlish, Kaplan, Amodei et al. 2018, "An empirical model of large-batch
  training", arXiv 1812.06162): B ← clip(⌈φ·B_simple⌉, B, B_max) with the simple noise
  scale B_simple = EMA(tr Σ)/EMA(||G||²), numerator and denominator smoothed
  separately (their appendix A), bias-corrected EMAs with decay ``ema``. The batch is
  first changed after ``warmup`` measurements; while EMA(||G||²) ≤ 0 (the noise swamps
  the estimate of the signal) B is kept rather than sent to B_max.
- ``normtest`` (Byrd, Chin, Nocedal, Wu 2012, "Sample size selection in optimization
  methods for machine learning", the norm test): the measured batch of b samples passes
  when tr Σ / b ≤ θ²·||ḡ_b||² (tr Σ is the 1-norm of the sample variance vector); when
  it fails, B ← clip(⌈tr Σ / (θ²·||ḡ_b||²)⌉, B, B_max).

LR coupling (``lr_scaling``): ``none`` (the suite's schedule), ``linear`` (× B/B0),
``sqrt`` (× √(B/B0)) or ``adascale`` (× AdaScale's gain r, from the latest estimates;
:func:`divebench.policies.common.adascale_gain`). AdaScale's stretching of the
schedule is not applied: the suite's schedule stays indexed by epoch.
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
    resolve_max,
)
from divebench.policy import Decision, Policy, PolicyConfig, PolicyState, StepStats, SuiteContext


@dataclass
class StepRuleConfig(PolicyConfig):
    """Keys shared by the per-step rules (each rule's own keys are added to these)."""

    interval: int = 10  # measure every interval-th step (1 = every step)
    max_batch_size: int = 0  # 0 = the suite's max_batch_size
    lr_scaling: AdaptiveLrScaling = "none"
    estimator: Literal["exact", "microbatch"] = "exact"
    bn: Literal["contribution", "paper"] = "contribution"
    micro_batches: int = 4  # estimator=microbatch: micro-batches per measured batch

    def _check(self, name: str, ctx: SuiteContext) -> None:
        if self.interval < 1:
            raise ValueError(f"{name}.interval={self.interval} is not valid: expected an int >= 1")
        if self.micro_batches < 2:
            raise ValueError(f"{name}.micro_batches={self.micro_batches} is not valid: expected an int >= 2")
        resolve_max(self.max_batch_size, ctx.max_batch_size, ctx.initial_batch_size, name)


class StepRule(Policy):
    """Shared machinery: when to measure, applying each measurement once, the LR."""

    stats = "per_sample_sq_norms"
    stats_scope = "step"
    per_step = True

    def __init__(self, config: StepRuleConfig, ctx: SuiteContext) -> None:
        super().__init__(config, ctx)
        self.rule_cfg = config
        self.b_max = resolve_max(config.max_batch_size, ctx.max_batch_size, ctx.initial_batch_size, self.name)
        self.batch_size = ctx.initial_batch_size
        self.applied_step = -1  # the last step whose statistics were applied
        self.trace_cov = math.nan  # latest estimates (for lr_scaling=adascale)
        self.grad_sq = math.nan

    def update(self, st: StepStats) -> None:
        """Apply one measured step's statistics (sets ``self.batch_size``)."""
        raise NotImplementedError

    def _decide(self, state: PolicyState) -> Decision:
        st = state.step_stats
        if st is not None and st.step > self.applied_step:
            self.applied_step = st.step
            self.update(st)
        keep_measuring = self.batch_size < self.b_max or self.rule_cfg.lr_scaling == "adascale"
        measure = keep_measuring and state.step % self.rule_cfg.interval == 0
        if self.rule_cfg.lr_scaling == "adascale":
            mult = adascale_gain(self.trace_cov, self.grad_sq, self.batch_size, self.ctx.initial_batch_size)
        else:
            mult = lr_scale(self.rule_cfg.lr_scaling, self.batch_size, self.ctx.initial_batch_size)
        return Decision(self.batch_size, mult, measure)

    def decide_epoch(self, state: PolicyState) -> Decision:
        return self._decide(state)

    def decide_step(self, state: PolicyState) -> Decision | None:
        return self._decide(state)

    def stats_options(self) -> dict[str, Any]:
        c = self.rule_cfg
        return {"estimator": c.estimator, "bn": c.bn, "micro_batches": c.micro_batches}

    def state_dict(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "applied_step": self.applied_step,
                "trace_cov": self.trace_cov, "grad_sq": self.grad_sq}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batch_size = int(state["batch_size"])
        self.applied_step = int(state["applied_step"])
        self.trace_cov = float(state["trace_cov"])
        self.grad_sq = float(state["grad_sq"])


@dataclass
class GNSConfig(StepRuleConfig):
    ema: float = 0.95  # decay of the EMAs of tr Σ and ||G||² (0 = no smoothing)
    fraction: float = 1.0  # φ: target batch = φ·B_simple
    warmup: int = 10  # measurements averaged before the batch first changes

    def validate(self, ctx: SuiteContext) -> None:
        self._check("gns", ctx)
        if not 0 <= self.ema < 1:
            raise ValueError(f"gns.ema={self.ema} is not valid: expected a number in [0, 1)")
        check_finite_positive("gns.fraction", self.fraction)
        if self.warmup < 1:
            raise ValueError(f"gns.warmup={self.warmup} is not valid: expected an int >= 1")


def gns_target(trace_ema: float, grad_sq_ema: float, fraction: float, batch_size: int, b_max: int) -> tuple[float, int]:
    """(B_simple, new B): B_simple = tr Σ/||G||², new B = clip(⌈φ·B_simple⌉, B, B_max);
    NaN estimates or ||G||² ≤ 0 (no usable signal estimate: B_simple is NaN) keep B."""
    if math.isnan(trace_ema) or math.isnan(grad_sq_ema) or grad_sq_ema <= 0:
        return math.nan, batch_size
    b_simple = trace_ema / grad_sq_ema
    return b_simple, int(min(max(math.ceil(fraction * b_simple), batch_size), b_max))


class GNS(StepRule):
    """Gradient noise scale (McCandlish et al. 2018): grow B toward B_simple (module doc)."""

    name = "gns"
    description = "Gradient noise scale (McCandlish et al. 2018): grow B toward B_simple = trΣ/|G|² per step"
    config_class = GNSConfig

    def __init__(self, config: GNSConfig, ctx: SuiteContext) -> None:  # type: ignore[override]
        super().__init__(config, ctx)
        self.cfg = config
        self.ema_trace = 0.0
        self.ema_grad_sq = 0.0
        self.ema_count = 0
        self.b_simple = math.nan

    def update(self, st: StepStats) -> None:
        trace, grad_sq = st.trace_cov, st.true_grad_sq_norm
        if not (math.isfinite(trace) and math.isfinite(grad_sq)):
            return  # a batch of one sample carries no variance
        beta = self.cfg.ema
        self.ema_trace = beta * self.ema_trace + (1 - beta) * trace
        self.ema_grad_sq = beta * self.ema_grad_sq + (1 - beta) * grad_sq
        self.ema_count += 1
        correction = 1 - beta**self.ema_count
        self.trace_cov, self.grad_sq = self.ema_trace / correction, self.ema_grad_sq / correction
        b_simple, batch_size = gns_target(self.trace_cov, self.grad_sq, self.cfg.fraction,
                                          self.batch_size, self.b_max)
        self.b_simple = b_simple
        if self.ema_count >= self.cfg.warmup:
            self.batch_size = batch_size

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "ema_trace": self.ema_trace, "ema_grad_sq": self.ema_grad_sq,
                "ema_count": self.ema_count, "b_simple": self.b_simple}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.ema_trace = float(state["ema_trace"])
        self.ema_grad_sq = float(state["ema_grad_sq"])
        self.ema_count = int(state["ema_count"])
        self.b_simple = float(state["b_simple"])


@dataclass
class NormTestConfig(StepRuleConfig):
    theta: float = 0.9  # θ: the test's tolerance, tr Σ / B ≤ θ²·||ḡ_B||²

    def validate(self, ctx: SuiteContext) -> None:
        self._check("normtest", ctx)
        check_finite_positive("normtest.theta", self.theta)


def normtest_rule(trace_cov: float, batch_grad_sq: float, theta: float, tested: int, batch_size: int,
                  b_max: int) -> int:
    """Byrd et al. 2012's norm test on a measured batch of ``tested`` samples: keep B
    while tr Σ/b ≤ θ²·||ḡ_b||², else B ← clip(⌈tr Σ/(θ²·||ḡ_b||²)⌉, B, B_max) (never
    smaller; NaN keeps B; ||ḡ_b||² = 0 < tr Σ gives B_max)."""
    if math.isnan(trace_cov) or math.isnan(batch_grad_sq):
        return batch_size
    bound = theta * theta * batch_grad_sq
    if trace_cov / tested <= bound:
        return batch_size
    if bound <= 0:
        return b_max
    return int(min(max(math.ceil(trace_cov / bound), batch_size), b_max))


class NormTest(StepRule):
    """The norm test (Byrd, Chin, Nocedal, Wu 2012): grow B when the batch's variance
    exceeds θ²·||ḡ_B||² (module doc)."""

    name = "normtest"
    description = "Norm test (Byrd et al. 2012): grow B when trΣ/B > θ²|ḡ_B|², per step"
    config_class = NormTestConfig

    def __init__(self, config: NormTestConfig, ctx: SuiteContext) -> None:  # type: ignore[override]
        super().__init__(config, ctx)
        self.cfg = config

    def update(self, st: StepStats) -> None:
        self.trace_cov, self.grad_sq = st.trace_cov, st.true_grad_sq_norm
        self.batch_size = normtest_rule(st.trace_cov, st.batch_grad_sq_norm, self.cfg.theta,
                                        st.batch_size, self.batch_size, self.b_max)
