"""The policy contract: the state a batch-size policy sees and the decision it returns.

A *policy* decides, as training goes, how large the next batches are, how the learning
rate follows, and whether the next epoch's gradient statistics should be measured.

Rules of the contract (the engine enforces every one of them):

- ``decide_epoch(state)`` is called once before every epoch, epoch 0 included. Its
  :class:`Decision` holds for the whole epoch unless the policy also overrides
  ``decide_step``.
- ``decide_step(state)`` is called before every optimiser step *only* when a policy
  sets ``per_step = True``; returning ``None`` keeps the current decision. Per-step
  policies (gradient-noise-scale or SimiGrad-like rules) use it; epoch policies don't.
- ``batch_size`` is the *logical* (global) batch size: an ``int`` >= 1. Batches larger
  than the suite's ``max_micro_batch`` are split into micro-batches with gradient
  accumulation by the engine; the policy never sees that. A batch size larger than the
  dataset is clipped to the dataset size by the sampler.
- ``lr_multiplier`` is finite and > 0; the learning rate of every step is the suite's
  base schedule at that epoch times this multiplier.
- ``measure=True`` asks the engine to collect the gradient statistics the policy
  declared in ``stats``. With ``stats_scope = "epoch"`` (the default) it holds for the
  coming epoch: the epoch's sums (:class:`GradStats`) arrive in ``state.stats`` at the
  next ``decide_epoch``. With ``stats_scope = "step"`` (which needs ``per_step = True``)
  it holds for every step while the decision holds: each measured step's statistics
  (:class:`StepStats`, that step's batch at that step's weights) arrive in
  ``state.step_stats`` at the next ``decide_step`` (or ``decide_epoch``), and stay there
  until another step is done (the end of an epoch hands them to a final ``decide_step``
  and to the next ``decide_epoch`` too: apply each once, keyed by ``step_stats.step``).
  A rule that measures every k-th step returns ``measure=True`` on those steps only and
  pays for nothing else. Policies that declare ``stats = None`` never get any, and the engine
  builds no statistics machinery for them.
- ``state`` is read-only (a frozen dataclass). Anything the policy needs to remember
  lives on the policy object and must round-trip through ``state_dict`` /
  ``load_state_dict`` (it is part of every checkpoint).

An invalid decision stops the run with one line naming the policy, the plugin that
registered it and the bad value (:class:`InvalidDecision`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

StatsKind = Literal["per_sample_sq_norms"]
StatsScope = Literal["epoch", "step"]


@dataclass(frozen=True)
class GradStats:
    """Gradient statistics of one measured epoch (taken along the trajectory).

    ``sum_sq_norms`` is Σ_i ||g_i||² over the epoch's samples (per-sample gradients of
    the loss, weight decay excluded; an estimate for the ``epoch``/``microbatch``
    estimators); ``grad_sum_sq_norm`` is ||Σ_t Σ_{i∈batch t} g_i||². Their ratio is the
    gradient diversity Δ̂ (Yin et al. 2018); ``n_diversity`` = n·Δ̂.
    """

    sum_sq_norms: float
    grad_sum_sq_norm: float
    n_samples: int
    diversity: float
    n_diversity: float
    estimator: str
    time_s: float


@dataclass(frozen=True)
class StepStats:
    """Gradient statistics of one measured step: its batch of B samples, at the weights
    of that step (``stats_scope = "step"``).

    The two-batch-size view of McCandlish et al. 2018 ("An empirical model of
    large-batch training", appendix A): the step's batch is the *big* batch and its
    *small* batches are single samples (``exact``: per-sample gradients) or the k
    micro-batches of the batch (``microbatch``). With P = Σ_j ||b_j·ĝ_j||² over the
    small batches and A = Σ_j b_j²:

    - ``small_batch_size`` = A/B (1 for ``exact``; m for k equal micro-batches of m);
    - ``small_sq_norm`` = P/A, the mean squared norm of a small batch's mean gradient
      |G_small|² (for ``exact``: Σ_i ||g_i||² / B);
    - ``grad_sum_sq_norm`` = ||Σ_{i∈B} g_i||² = B²·|G_big|²;
    - ``sum_sq_norms`` = Σ_{i∈B} ||g_i||²: exact, or for ``microbatch`` the unbiased
      two-batch estimate (★ in :mod:`divebench.stats.estimators`) from P, A and
      ``grad_sum_sq_norm``.

    The derived properties are the unbiased estimators every rule uses: ``trace_cov``
    (tr Σ, the per-sample gradient variance) and ``true_grad_sq_norm`` (||G||², the
    squared norm of the expected gradient), from ``sum_sq_norms`` and B.
    """

    batch_size: int  # B, the step's logical batch
    sum_sq_norms: float  # Σ_{i∈B} ||g_i||² (exact, or the microbatch estimate)
    grad_sum_sq_norm: float  # ||Σ_{i∈B} g_i||²
    small_batch_size: float  # A/B: 1 for exact, the micro-batch size for microbatch
    small_sq_norm: float  # P/A: mean ||ĝ_small||² over the small batches
    estimator: str  # "exact" or "microbatch"
    step: int  # the step's index (0-based: optimiser steps taken before it)
    time_s: float  # the provider's own time for this step

    @property
    def batch_grad_sq_norm(self) -> float:
        """||ḡ_B||², the squared norm of the batch's mean gradient."""
        return self.grad_sum_sq_norm / float(self.batch_size) ** 2

    @property
    def trace_cov(self) -> float:
        """tr Σ ≈ (Σ_i ||g_i||² − B·||ḡ_B||²)/(B − 1), the unbiased sample variance of the
        per-sample gradients (NaN for B = 1)."""
        b = self.batch_size
        if b < 2:
            return math.nan
        return (self.sum_sq_norms - b * self.batch_grad_sq_norm) / (b - 1)

    @property
    def true_grad_sq_norm(self) -> float:
        """||G||² ≈ ||ḡ_B||² − tr Σ / B, unbiased (may be negative when noise dominates;
        NaN for B = 1)."""
        return self.batch_grad_sq_norm - self.trace_cov / self.batch_size


@dataclass(frozen=True)
class EvalResult:
    """One evaluation on the suite's validation split (accuracy as a fraction 0..1)."""

    val_loss: float
    val_acc: float


@dataclass(frozen=True)
class SuiteContext:
    """What a policy may know about the suite it runs in, fixed for the whole run."""

    suite: str
    dataset_size: int
    initial_batch_size: int
    max_batch_size: int
    epochs: int
    base_lr: float
    seed: int
    # the suite's base LR schedule, one value per epoch (empty: constant ``base_lr``)
    lr_by_epoch: tuple[float, ...] = ()

    def lr_at(self, epoch: int) -> float:
        """The suite's base learning rate at ``epoch`` (0-based)."""
        if not self.lr_by_epoch:
            return self.base_lr
        return self.lr_by_epoch[min(max(epoch, 0), len(self.lr_by_epoch) - 1)]


# stats_options() keys and their defaults (Policy.stats_options documents them)
STATS_OPTIONS: dict[str, Any] = {"estimator": "exact", "bn": "contribution", "micro_batches": 4}


@dataclass(frozen=True)
class PolicyState:
    """Read-only state handed to a policy before each epoch (and step, if per-step)."""

    epoch: int  # the epoch about to start, 0-based
    step: int  # optimiser steps taken so far
    samples_seen: int  # training samples consumed so far
    train_time_s: float  # timed training so far (the clock's train region)
    dataset_size: int
    # current logical batch size: the last decision's; at epoch 0, before any decision,
    # the suite's B0 (``ctx.initial_batch_size``, the ``batch_size`` run key)
    batch_size: int
    lr: float  # learning rate of the last step (base schedule × multiplier)
    lr_multiplier: float  # the last decision's multiplier
    last_eval: EvalResult | None  # latest evaluation, None before the first
    stats: GradStats | None  # statistics of the last epoch if it was measured
    # statistics of the last step if it was measured (stats_scope = "step"); None otherwise
    step_stats: StepStats | None = None


@dataclass(frozen=True)
class Decision:
    """What the policy wants for the coming epoch (or step)."""

    batch_size: int
    lr_multiplier: float = 1.0
    measure: bool = False


class InvalidDecision(ValueError):
    """A policy returned something the contract does not allow."""


@dataclass
class PolicyConfig:
    """Base class of every policy's typed config (a dataclass with defaults).

    Subclasses add fields and override :meth:`validate` to raise ``ValueError`` with a
    message naming the key and the allowed values.
    """

    def validate(self, ctx: SuiteContext) -> None:  # noqa: B027 - optional hook
        """Raise ``ValueError`` naming the bad key and what would be right."""


class Policy:
    """Base class of batch-size policies. Subclass it and register it via a plugin.

    Class attributes:
        name: registry name (``divebench run policy=NAME``), lower-case, no dots.
        description: one line for ``divebench policies``.
        config_class: the typed config dataclass (subclass of :class:`PolicyConfig`).
        stats: the gradient statistics the policy needs, or ``None``.
        stats_scope: ``"epoch"`` (``measure`` covers an epoch, :class:`GradStats` in
            ``state.stats``) or ``"step"`` (``measure`` covers the steps its decision
            holds for, :class:`StepStats` in ``state.step_stats``; needs ``per_step``
            and the ``exact`` or ``microbatch`` estimator).
        per_step: whether ``decide_step`` must be called before every step.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    config_class: ClassVar[type[PolicyConfig]] = PolicyConfig
    stats: ClassVar[StatsKind | None] = None
    stats_scope: ClassVar[StatsScope] = "epoch"
    per_step: ClassVar[bool] = False

    def __init__(self, config: PolicyConfig, ctx: SuiteContext) -> None:
        self.config = config
        self.ctx = ctx

    def decide_epoch(self, state: PolicyState) -> Decision:
        """Return the decision for the epoch ``state.epoch`` (called before it starts)."""
        raise NotImplementedError

    def decide_step(self, state: PolicyState) -> Decision | None:
        """Per-step decision (only called when ``per_step`` is True); None keeps the last."""
        return None

    def stats_options(self) -> dict[str, Any]:
        """Options for the statistics provider of a policy that declares ``stats``;
        any key left out takes its default (:data:`STATS_OPTIONS`):

        - ``estimator`` (str, default ``"exact"``): ``exact`` (Opacus per-sample norms,
          one ordinary backward), ``epoch`` (two-batch-size estimator over the epoch, no
          per-sample work) or ``microbatch`` (the same within each batch);
        - ``bn`` (str, default ``"contribution"``): the BatchNorm definition of
          ``exact``, ``contribution`` or ``paper``;
        - ``micro_batches`` (int >= 2, default 4): micro-batches per batch for
          ``microbatch``.

        An unknown key or a bad value fails this policy's run (status ``failed``, one
        line in the progress output, the traceback in ``run.log``); the suite goes on.
        """
        return dict(STATS_OPTIONS)

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state that ``load_state_dict`` restores (checkpoints)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""


def config_fields(config_class: type[PolicyConfig]) -> dict[str, dataclasses.Field[Any]]:
    """The typed keys of a policy config, by name."""
    return {f.name: f for f in dataclasses.fields(config_class)}


def validate_decision(decision: object, policy: Policy, plugin: str) -> Decision:
    """Check a decision against the contract; raise :class:`InvalidDecision` naming
    the policy, its plugin and the bad value."""
    where = f"policy '{policy.name}' (plugin '{plugin}')"
    if not isinstance(decision, Decision):
        raise InvalidDecision(
            f"{where} returned {type(decision).__name__} {decision!r}; expected a Decision"
        )
    bs = decision.batch_size
    if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
        raise InvalidDecision(
            f"{where} returned batch_size={bs!r}; expected an int >= 1"
        )
    lr = decision.lr_multiplier
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise InvalidDecision(
            f"{where} returned lr_multiplier={lr!r}; expected a finite number > 0"
        )
    if not isinstance(decision.measure, bool):
        raise InvalidDecision(f"{where} returned measure={decision.measure!r}; expected a bool")
    return decision
