"""Σ_i ||g_i||² without per-sample gradients: two-batch-size estimators.

Both estimators rest on one identity. Take a population of N samples with gradients
g_i at fixed weights, mean G and V = (1/N)·Σ_i ||g_i − G||². A batch of b samples
drawn without replacement has mean ĝ_b with

    E ||b·ĝ_b||² = b²·||G||² + b·(N − b)/(N − 1) · V.

If batches of sizes b_1..b_T partition the population (Σ b_t = N, each one a uniform
random subset: a shuffled epoch, or a shuffled batch cut into micro-batches), then with
P = Σ_t ||b_t·ĝ_t||², A = Σ_t b_t² and the population sum's squared norm
Q_S = ||Σ_i g_i||² = N²·||G||²,

    E[P] = A·Q_S/N² + (N² − A)/(N − 1) · V,

so an unbiased estimate of Σ_i ||g_i||² = N·V + Q_S/N is

    Σ̂ = N·(N − 1)·(P − A·Q_S/N²) / (N² − A) + Q_S/N.                      (★)

With equal batches (A = N·b) this is McCandlish et al.'s ((N−1)·P − (b−1)·Q_S)/(N − b)
(architecture.md). Writing it with A lets a ragged last batch and batch sizes that
change within the epoch enter exactly; nothing is dropped or reweighted. When the
population is one batch (A = N²) the data carry no information on V and (★) is
undefined: the estimate is NaN unless N = 1, where Σ̂ = P exactly.

``epoch`` (:class:`EpochEstimator`)
    The population is the epoch's samples, each optimiser step's logical batch a
    small batch: P = Σ_t ||B_t·ḡ_t||² from ``p.grad`` after each batch, Q_S = ||S||²
    with S = Σ_t B_t·ḡ_t (DiveBatch's own denominator). Numerator and denominator
    are accumulated over the epoch and divided once. No per-sample work: one fused
    float64 norm and one fused add per step. The identity assumes fixed weights;
    along a trajectory the drift of the weights inflates P relative to Q_S, so the
    estimate runs high when the learning rate moves the weights fast.

``microbatch`` (:class:`MicroBatchEstimator`)
    Each measured logical batch is split into k micro-batches (the loop asks
    :meth:`min_micro_batches`); the population is the logical batch, the small
    batches its micro-batches, all at the *same* weights. (★) per step estimates
    Σ_{i∈t} ||g_i||² without bias whatever the drift between steps, and the epoch's
    Σ̂ is the sum of the per-step estimates (each one linear in the data: no noisy
    division per step). The micro-batch gradient m_j·ĝ_j is recovered as
    (p.grad after − p.grad before the micro backward)·m_j/loss_scale, which needs one
    float32 copy of the gradients (the only extra memory besides S). A batch of size 1
    is its own per-sample gradient (exact). The epoch's S and ||S||² are as above.

For BatchNorm models both estimate the noise of the gradient of the batches they see
(each micro-batch is its own BN batch); the ``bn`` option of the exact provider does
not apply to them.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import nn

from divebench.policy import GradStats, StepStats
from divebench.stats.exact import GradientSum, make_grad_stats, make_step_stats, sq_norm_sum


def two_batch_estimate(p_sum: float, a_sum: float, q_s: float, n: float) -> float:
    """Σ̂_i ||g_i||² from (★): P, A = Σ b_t², Q_S = ||Σ g_i||², N samples (module doc)."""
    if n <= 0:
        return math.nan
    if n == 1:
        return p_sum
    denom = n * n - a_sum
    if denom <= 0:
        return math.nan
    return n * (n - 1) * (p_sum - a_sum * q_s / (n * n)) / denom + q_s / n


class _EstimatorBase:
    """Shared plumbing: no wrapping, a gradient sum S, timing, resumable state."""

    name = ""

    def __init__(self) -> None:
        self._params: list[nn.Parameter] = []
        self._measure = False
        self._step_scope = False  # set by the first start_step (stats_scope = "step")
        self._last_step: tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, float] | None = None
        self._step_time0 = 0.0
        self._reset()

    def wrap(self, model: nn.Module) -> nn.Module:
        """No hooks needed: the model is trained as is."""
        self._params = [p for p in model.parameters() if p.requires_grad]
        return model

    def min_micro_batches(self, batch_size: int) -> int:
        return 1

    def set_dist(self, dist: Any) -> None:
        """Data-parallel run: ``epoch`` reads only p.grad, which DDP has all-reduced,
        so it is the one-process estimator unchanged."""

    def start_epoch(self, measure: bool, dataset_size: int) -> None:
        self._reset()
        self._measure = measure

    def after_micro_backward(self, micro_size: int, loss_scale: float) -> None:
        return None

    def abort_batch(self) -> None:
        """Nothing of a batch is kept before :meth:`after_batch`."""
        return None

    def start_step(self, measure: bool) -> None:
        """Step scope: measure the coming step or not; nothing is kept for the epoch."""
        self._step_scope = True
        self._measure = measure
        self._last_step = None
        self._step_time0 = self._own_time_s

    def end_step(self, step: int) -> StepStats | None:
        """The measured step's :class:`StepStats` (None when it was not measured)."""
        if self._last_step is None:
            return None
        b, estimate, g_sq, p_sum, a_sum = self._last_step
        self._last_step = None
        return make_step_stats(b, float(estimate.item()), float(g_sq.item()), float(p_sum.item()),
                               a_sum, self.name, step, self._own_time_s - self._step_time0)

    def end_epoch(self) -> GradStats | None:
        if not self._measure or self._step_scope:
            return None
        start = time.perf_counter()
        q_s = float(self._grad_sum.sq_norm().item())
        estimate = self._estimate(q_s)
        own = self._own_time_s + time.perf_counter() - start
        stats = make_grad_stats(estimate, q_s, self._n_samples, self.name, own)
        self._measure = False
        self._reset()
        return stats

    def state_dict(self) -> dict[str, Any]:
        return {
            "measure": self._measure,
            "grad_sum": self._grad_sum.state(),
            "n_samples": self._n_samples,
            "time_s": self._own_time_s,
            **{k: float(v.item()) for k, v in self._scalars().items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a mid-epoch state (call after :meth:`wrap`)."""
        self._reset()
        self._measure = bool(state["measure"])
        self._grad_sum.load(state["grad_sum"], self._params)
        self._n_samples = int(state["n_samples"])
        self._own_time_s = float(state["time_s"])
        for key, value in self._scalars().items():
            value.fill_(float(state[key]))

    def _device(self) -> torch.device:
        return self._params[0].device if self._params else torch.device("cpu")

    def _zero(self) -> torch.Tensor:
        return torch.zeros((), dtype=torch.float64, device=self._device())

    def _reset(self) -> None:
        self._grad_sum = GradientSum()
        self._n_samples = 0
        self._own_time_s = 0.0

    def _scalars(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _estimate(self, q_s: float) -> float:
        raise NotImplementedError


class EpochEstimator(_EstimatorBase):
    """``estimator=epoch``: each step's batch is the small batch, the epoch the large one."""

    name = "epoch"

    def start_step(self, measure: bool) -> None:
        raise ValueError("estimator=epoch has no per-step statistics (its small batches are the "
                         "epoch's steps); use estimator=exact or microbatch for stats_scope='step'")

    def after_batch(self, batch_size: int) -> None:
        if not self._measure:
            return
        start = time.perf_counter()
        grads = [p.grad for p in self._params if p.grad is not None]
        if grads:
            self._p_sum.add_(sq_norm_sum(grads), alpha=float(batch_size) ** 2)
        self._a_sum += float(batch_size) ** 2
        self._grad_sum.add(self._params, batch_size)
        self._n_samples += batch_size
        self._own_time_s += time.perf_counter() - start

    def _reset(self) -> None:
        super()._reset()
        self._p_sum = self._zero()
        self._a_sum = 0.0

    def _scalars(self) -> dict[str, torch.Tensor]:
        return {"p_sum": self._p_sum}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "a_sum": self._a_sum}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._a_sum = float(state["a_sum"])

    def _estimate(self, q_s: float) -> float:
        return two_batch_estimate(float(self._p_sum.item()), self._a_sum, q_s, self._n_samples)


class MicroBatchEstimator(_EstimatorBase):
    """``estimator=microbatch``: each batch's k micro-batches against the batch itself.

    Args:
        micro_batches: k >= 2, the number of micro-batches of a measured batch
            (fewer only when the batch has fewer samples).
    """

    name = "microbatch"

    def __init__(self, micro_batches: int = 4) -> None:
        if (
            isinstance(micro_batches, bool)
            or not isinstance(micro_batches, int)
            or micro_batches < 2
        ):
            raise ValueError(f"micro_batches={micro_batches!r}; expected an int >= 2")
        self.micro_batches = micro_batches
        self._prev: list[torch.Tensor] | None = None
        super().__init__()

    def min_micro_batches(self, batch_size: int) -> int:
        return max(1, min(self.micro_batches, batch_size))

    def set_dist(self, dist: Any) -> None:
        if dist is not None:
            raise ValueError("estimator=microbatch is not defined for data-parallel runs yet (its micro-batch "
                             "gradients are local until DDP's all-reduce); use estimator=exact (or epoch, where the policy has it)")

    def after_micro_backward(self, micro_size: int, loss_scale: float) -> None:
        if not self._measure:
            return
        start = time.perf_counter()
        if self._prev is None:
            self._prev = [torch.zeros_like(p) for p in self._params]
        pairs = [
            (p.grad, q) for p, q in zip(self._params, self._prev, strict=True) if p.grad is not None
        ]
        if pairs:
            grads, prev = (list(t) for t in zip(*pairs, strict=True))
            if self._first_micro:
                # p.grad was zero before the batch's first backward.
                deltas = grads
            else:
                deltas = torch._foreach_sub(grads, prev)
            # p.grad gained loss_scale·ĝ_j; the micro-batch's sum gradient is m·ĝ_j.
            scale = micro_size / loss_scale
            self._p_step += sq_norm_sum(deltas) * (scale * scale)
            torch._foreach_copy_(prev, grads)
        self._a_step += float(micro_size) ** 2
        self._first_micro = False
        self._own_time_s += time.perf_counter() - start

    def after_batch(self, batch_size: int) -> None:
        if not self._measure:
            return
        start = time.perf_counter()
        b = float(batch_size)
        if self._a_step >= b * b and batch_size > 1:
            raise RuntimeError(
                f"estimator=microbatch got a measured batch of {batch_size} samples in one "
                "micro-batch; the loop must split it into min_micro_batches(B) parts"
            )
        grads = [p.grad for p in self._params if p.grad is not None]
        g_sq = sq_norm_sum(grads) * (b * b) if grads else self._zero()
        if batch_size == 1:
            estimate = self._p_step
        else:
            # (★) with the logical batch as population and its micro-batches as the
            # small batches: linear in P and ||B·ḡ||², so summing steps stays unbiased.
            estimate = (
                b
                * (b - 1)
                * (self._p_step - self._a_step * g_sq / (b * b))
                / (b * b - self._a_step)
                + g_sq / b
            )
        if self._step_scope:
            self._last_step = (batch_size, estimate, g_sq, self._p_step, self._a_step)
        else:
            self._q_sum += estimate
            self._grad_sum.add(self._params, batch_size)
            self._n_samples += batch_size
        self._p_step = self._zero()
        self._a_step = 0.0
        self._first_micro = True
        self._own_time_s += time.perf_counter() - start

    def abort_batch(self) -> None:
        """Forget the current batch's micro-batches (the loop redoes it after an OOM)."""
        self._p_step = self._zero()
        self._a_step = 0.0
        self._first_micro = True

    def start_epoch(self, measure: bool, dataset_size: int) -> None:
        super().start_epoch(measure, dataset_size)
        if not measure:
            self._prev = None  # the copy is only needed while measuring

    def _reset(self) -> None:
        super()._reset()
        self._q_sum = self._zero()
        self._p_step = self._zero()
        self._a_step = 0.0
        self._first_micro = True

    def _scalars(self) -> dict[str, torch.Tensor]:
        return {"q_sum": self._q_sum}

    def _estimate(self, q_s: float) -> float:
        return float(self._q_sum.item())
