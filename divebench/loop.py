"""The training loop: one function, top to bottom.

Where to look: the policy is consulted at (1) before each epoch and (1b) before each
step for per-step policies; gradient statistics are collected at (3) only on epochs the
policy marked for measurement; the clock's timed region covers (2)-(4); evaluation (5)
and bookkeeping (6) are off the clock.
"""

from __future__ import annotations

import math
import signal
import threading
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from divebench.clock import Clock
from divebench.data.base import DataBundle
from divebench.data.sampler import PermutationSampler
from divebench.policy import (
    Decision,
    EvalResult,
    GradStats,
    Policy,
    PolicyState,
    StepStats,
    validate_decision,
)
from divebench.stats.base import StatsProvider


class Diverged(Exception):
    """The training loss became NaN or infinite."""


class Interrupted(Exception):
    """SIGTERM/SIGINT arrived; a checkpoint was written at the step boundary."""

    def __init__(self, message: str, signum: int = 2) -> None:
        super().__init__(message)
        self.signum = signum


@dataclass
class Setup:
    """Everything one run trains with (built by divebench.engine)."""

    model: nn.Module  # the module to train (wrapped by the statistics provider, if any)
    optimizer: torch.optim.Optimizer
    policy: Policy
    plugin: str  # the plugin that registered the policy (named in errors)
    provider: StatsProvider | None
    data: DataBundle
    device: torch.device
    epochs: int
    base_lr: Callable[[int], float]  # the suite's schedule: epoch -> LR
    max_micro_batch: int
    eval_batch_size: int
    seed: int
    amp: str = "off"
    channels_last: bool = False
    dtype: torch.dtype = torch.float32  # of the model's inputs (and weights)
    log: Callable[[str], None] = print  # events worth keeping (OOM retries): the run log
    dist: Any = None  # divebench.distributed.Dist under torchrun with WORLD_SIZE > 1, else None


@dataclass
class Progress:
    """The loop's position; all of it goes into a checkpoint."""

    epoch: int = 0  # epochs completed
    step: int = 0
    samples_seen: int = 0
    last_eval: EvalResult | None = None
    stats: GradStats | None = None
    step_stats: StepStats | None = None  # the last step's, if it was measured (step scope)
    decision: Decision | None = None
    lr: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def _evaluate(s: Setup) -> EvalResult:
    s.model.eval()
    loss_sum = torch.zeros((), device=s.device, dtype=torch.float64)
    correct = torch.zeros((), device=s.device, dtype=torch.long)
    with torch.no_grad(), _autocast(s):
        for i in range(0, s.data.y_val.shape[0], s.eval_batch_size):
            x = _to_input(s, s.data.eval_transform(s.data.x_val[i : i + s.eval_batch_size]))
            y = s.data.y_val[i : i + s.eval_batch_size]
            out = _logits_for_loss(s.model(x))
            loss_sum += nn.functional.cross_entropy(out, y, reduction="sum").double()
            correct += (out.argmax(1) == y).sum()
    s.model.train()
    n = s.data.y_val.shape[0]
    return EvalResult(float(loss_sum) / n, int(correct) / n)


def _autocast(s: Setup) -> Any:
    if s.amp == "bf16":
        return torch.autocast(s.device.type, dtype=torch.bfloat16)
    return nullcontext()


def _to_input(s: Setup, x: torch.Tensor) -> torch.Tensor:
    if x.is_floating_point():  # token ids and other integer inputs stay as they are
        x = x.to(s.dtype)  # no copy when it is already (float features; float32 transforms)
    return x.contiguous(memory_format=torch.channels_last) if s.channels_last and x.dim() == 4 else x


def _logits_for_loss(out: torch.Tensor) -> torch.Tensor:
    """Half-precision logits (autocast) are lifted to float32 for the loss; float32 and
    float64 logits are used as they are."""
    return out.float() if out.dtype in (torch.float16, torch.bfloat16) else out


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB -> MiB


def train(
    s: Setup,
    clock: Clock,
    on_epoch: Callable[[dict[str, Any]], None],
    checkpoint: Callable[[Progress, PermutationSampler, torch.Generator, dict[str, Any] | None], None],
    progress: Progress | None = None,
    resume_epoch_state: dict[str, Any] | None = None,
) -> Progress:
    """Train ``s.model`` for ``s.epochs`` epochs under ``s.policy``; returns the final
    progress. ``on_epoch(row)`` receives each epoch's metrics row (off the clock);
    ``checkpoint`` is called before the first epoch of a fresh run, after each epoch and
    at a signal's step boundary."""
    p = progress or Progress()
    n = s.data.train_size
    sampler = PermutationSampler(n, s.seed, s.device)
    aug_gen = torch.Generator().manual_seed(s.seed * 7919 + 17)
    stop_signal: list[int] = []
    step_scope = s.provider is not None and s.policy.stats_scope == "step"
    micro = [s.max_micro_batch]  # the largest micro-batch known to fit (lowered on OOM)

    def _on_signal(signum: int, frame: Any) -> None:
        stop_signal.append(signum)

    # A signal only sets a flag: the loop checkpoints at the next step boundary and stops.
    old_handlers = {}
    if threading.current_thread() is threading.main_thread():
        old_handlers = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        if progress is None:
            # an epoch-0 checkpoint: a run killed before its first epoch's checkpoint
            # resumes in its own folder instead of leaving a stale one behind
            with clock.region("other"):
                checkpoint(p, sampler, aug_gen, None)
        while p.epoch < s.epochs:
            epoch = p.epoch
            epoch_start_train_s = clock.train_time_s
            loss_sum = torch.zeros((), device=s.device, dtype=torch.float64)
            correct = torch.zeros((), device=s.device, dtype=torch.long)
            seen = 0
            stats_time_s = 0.0
            step_rows: list[dict[str, Any]] = []  # measured steps (step scope): steps.jsonl
            if s.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(s.device)
            with clock.region("train"):
                # ---- (1) the policy decides the epoch's batch size, LR factor, measurement
                if resume_epoch_state is None:
                    state = _state(s, p, clock, epoch, n)
                    decision = validate_decision(s.policy.decide_epoch(state), s.policy, s.plugin)
                    if s.dist is not None:  # every rank decides; rank 0's decision holds
                        decision = s.dist.broadcast(decision)
                    measure = decision.measure and s.provider is not None and not step_scope
                    if s.provider is not None:
                        s.provider.start_epoch(measure, n)
                    sampler.start_epoch(epoch)
                    aug_gen.manual_seed(s.seed * 1_000_003 + epoch * 7919 + 17)
                else:  # resuming mid-epoch from a signal-time checkpoint
                    decision, measure = p.decision, resume_epoch_state["measure"]  # type: ignore[assignment]
                    sampler.load_state_dict(resume_epoch_state["sampler"])
                    aug_gen.set_state(resume_epoch_state["aug_gen"].cpu())
                    loss_sum += resume_epoch_state["loss_sum"]
                    correct += resume_epoch_state["correct"]
                    seen = resume_epoch_state["seen"]
                    step_rows = list(resume_epoch_state.get("step_rows", []))
                    stats_time_s = resume_epoch_state.get("stats_time_s", 0.0)
                    epoch_start_train_s -= resume_epoch_state["epoch_train_s"]
                    resume_epoch_state = None
                assert decision is not None
                p.decision = decision
                while True:
                    # ---- (1b) per-step policies may change the decision before any step
                    if s.policy.per_step:
                        new = s.policy.decide_step(_state(s, p, clock, epoch, n))
                        if new is not None:
                            new = validate_decision(new, s.policy, s.plugin)
                        if s.dist is not None:
                            new = s.dist.broadcast(new)
                        if new is not None:
                            decision = p.decision = new
                    idx = sampler.next_batch(decision.batch_size)
                    if idx is None:
                        break
                    # ---- (2)+(3) data, forward and backward; OOM halves the micro-batch
                    bsz = int(idx.shape[0])
                    if step_scope:  # this step's own decision says whether it is measured
                        assert s.provider is not None
                        measure = decision.measure
                        s.provider.start_step(measure)
                    batch_loss, batch_correct = _batch_with_oom_retry(s, idx, measure, aug_gen, micro)
                    loss_sum += batch_loss
                    correct += batch_correct
                    if measure:
                        assert s.provider is not None
                        s.provider.after_batch(bsz)
                    if step_scope:
                        assert s.provider is not None
                        p.step_stats = s.provider.end_step(p.step)
                        if p.step_stats is not None:
                            stats_time_s += p.step_stats.time_s
                            step_rows.append(_step_row(epoch, p.step_stats))
                    # ---- (4) the step: LR = base schedule x the policy's multiplier
                    p.lr = s.base_lr(epoch) * decision.lr_multiplier
                    for group in s.optimizer.param_groups:
                        group["lr"] = p.lr
                    s.optimizer.step()
                    p.step += 1
                    p.samples_seen += bsz
                    seen += bsz
                    if s.dist is not None:  # a signal on any rank stops every rank at this step
                        agreed = s.dist.any(stop_signal[0] if stop_signal else 0)
                        if agreed and not stop_signal:
                            stop_signal.append(agreed)
                    if stop_signal:
                        break
                if not stop_signal:
                    stats = s.provider.end_epoch() if s.provider is not None else None
                    if stats is not None:
                        stats_time_s = stats.time_s
                    if s.dist is not None:  # each rank summed its own slices
                        s.dist.sum_(loss_sum)
                        s.dist.sum_(correct)
                    train_loss = float(loss_sum) / max(seen, 1)
            if stop_signal:
                with clock.region("other"):
                    checkpoint(p, sampler, aug_gen, {
                        "measure": measure, "sampler": sampler.state_dict(),
                        "aug_gen": aug_gen.get_state(), "loss_sum": float(loss_sum),
                        "correct": int(correct), "seen": seen,
                        "step_rows": step_rows, "stats_time_s": stats_time_s,
                        "epoch_train_s": clock.train_time_s - epoch_start_train_s,
                    })
                raise Interrupted(f"stopped by signal {stop_signal[0]} in epoch {epoch + 1}; checkpoint written",
                                  stop_signal[0])
            if not math.isfinite(train_loss):
                raise Diverged(f"training loss became {train_loss} in epoch {epoch + 1}")
            # ---- (5) evaluation, off the clock
            with clock.region("eval"):
                p.last_eval = _evaluate(s)
            # ---- (6) bookkeeping, off the clock: metrics row, sinks, checkpoint
            with clock.region("other"):
                # the slowest rank's training time (one process: its own)
                train_time_s, epoch_time_s = clock.train_time_s, clock.train_time_s - epoch_start_train_s
                if s.dist is not None:
                    train_time_s, epoch_time_s = s.dist.max_floats([train_time_s, epoch_time_s])
                p.epoch += 1
                p.stats = stats
                row = {
                    "epoch": p.epoch, "step": p.step, "samples_seen": p.samples_seen,
                    "batch_size": min(decision.batch_size, n), "lr": p.lr,  # the sampler clips at n
                    "lr_multiplier": decision.lr_multiplier, "train_loss": train_loss,
                    "train_acc": int(correct) / max(seen, 1),
                    "val_loss": p.last_eval.val_loss, "val_acc": p.last_eval.val_acc,
                    "train_time_s": train_time_s,
                    "epoch_train_time_s": epoch_time_s,
                    "eval_time_s": clock.eval_time_s, "other_time_s": clock.other_time_s,
                    "wall_time_s": clock.wall_time_s, "measured": stats is not None,
                    "measured_steps": len(step_rows),
                    "grad_diversity": stats.diversity if stats else None,
                    "n_grad_diversity": stats.n_diversity if stats else None,
                    # the sums behind them, so a rule can be re-derived from the file
                    "sum_sq_norms": stats.sum_sq_norms if stats else None,
                    "grad_sum_sq_norm": stats.grad_sum_sq_norm if stats else None,
                    "stats_samples": stats.n_samples if stats else None,
                    "stats_time_s": stats_time_s, "peak_memory_mb": _peak_memory_mb(s.device),
                }
                if step_rows:
                    row["steps"] = step_rows  # the sink writes them to steps.jsonl
                on_epoch(row)
                checkpoint(p, sampler, aug_gen, None)
    finally:
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
    return p


class OutOfMemory(Exception):
    """Not even a micro-batch of one sample fits in memory."""


def _batch_with_oom_retry(
    s: Setup, idx: torch.Tensor, measure: bool, aug_gen: torch.Generator, micro: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward/backward of one logical batch; on out-of-memory, halve the micro-batch size
    and redo the batch with gradient accumulation (same augmentation, same gradient)."""
    aug_state = aug_gen.get_state()
    while True:
        try:
            if s.dist is not None:
                return _accumulate_ranks(s, idx, measure, aug_gen, micro[0])
            return _accumulate(s, idx, measure, aug_gen, micro[0])
        except torch.OutOfMemoryError:
            s.optimizer.zero_grad(set_to_none=True)
            if s.provider is not None and measure:
                s.provider.abort_batch()
            if s.device.type == "cuda":
                torch.cuda.empty_cache()
            now = min(micro[0], int(idx.shape[0]))
            if now <= 1:
                raise OutOfMemory("out of memory with a micro-batch of one sample: use a smaller model or input") from None
            micro[0] = now // 2
            s.log(f"out of memory at micro-batch {now}; retrying the batch with micro-batches of {micro[0]}")
            aug_gen.set_state(aug_state)


def _forward(
    s: Setup, sub: torch.Tensor, aug_gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One micro-batch's (logits, labels, mean loss): its samples augmented, forward."""
    x = _to_input(s, s.data.train_transform(s.data.x_train[sub], aug_gen))
    y = s.data.y_train[sub]
    with _autocast(s):
        out = s.model(x)
        loss = nn.functional.cross_entropy(_logits_for_loss(out), y)
    return out, y, loss


def _accumulate(
    s: Setup, idx: torch.Tensor, measure: bool, aug_gen: torch.Generator, max_micro: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the batch into k micro-batches whose scaled mean losses add up to the batch's
    mean loss, so the accumulated p.grad equals the full batch's gradient."""
    bsz = int(idx.shape[0])
    k = math.ceil(bsz / max_micro)
    if measure:
        assert s.provider is not None
        k = max(k, s.provider.min_micro_batches(bsz))
    s.optimizer.zero_grad(set_to_none=True)
    # k == 1 is the common case: no split, no loss scaling, no accumulator tensors. Those
    # small ops cost ~0.1 ms a step, ~5% of an MNIST-1D CNN step (bench/test_bench_loop.py).
    loss_sum: torch.Tensor | None = None
    correct: torch.Tensor | None = None
    for sub in (idx,) if k == 1 else idx.tensor_split(k):
        m = int(sub.shape[0])
        out, y, loss = _forward(s, sub, aug_gen)
        (loss if k == 1 else loss * (m / bsz)).backward()
        if measure:
            assert s.provider is not None
            s.provider.after_micro_backward(m, m / bsz)
        part_loss = loss.detach().double() * m
        part_correct = (out.detach().argmax(1) == y).sum()
        loss_sum = part_loss if loss_sum is None else loss_sum + part_loss
        correct = part_correct if correct is None else correct + part_correct
    assert loss_sum is not None and correct is not None
    return loss_sum, correct


def _accumulate_ranks(
    s: Setup, idx: torch.Tensor, measure: bool, aug_gen: torch.Generator, max_micro: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of a global batch under DistributedDataParallel
    (:mod:`divebench.distributed`): slice ``rank`` of W contiguous slices, micro-batched,
    each micro-batch's mean loss scaled by W·m/B so that DDP's average over ranks is the
    global batch's mean gradient; gradients are all-reduced on the last micro-batch
    only. A rank with an empty slice runs one sample at loss scale 0."""
    d = s.dist
    bsz = int(idx.shape[0])
    local = idx.tensor_split(d.world)[d.rank]
    empty = int(local.shape[0]) == 0
    if empty:
        local = idx[:1]
    m_local = int(local.shape[0])
    k = math.ceil(m_local / max_micro)
    if measure:
        assert s.provider is not None
        k = max(k, s.provider.min_micro_batches(m_local))
    s.optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=s.device, dtype=torch.float64)
    correct = torch.zeros((), device=s.device, dtype=torch.long)
    subs = (local,) if k == 1 else local.tensor_split(k)
    for j, sub in enumerate(subs):
        m = int(sub.shape[0])
        scale = 0.0 if empty else d.world * m / bsz
        with s.model.no_sync() if j < len(subs) - 1 else nullcontext():
            out, y, loss = _forward(s, sub, aug_gen)
            (loss * scale).backward()
        if measure:
            assert s.provider is not None
            if empty:
                s.provider.abort_batch()  # the stand-in sample contributes nothing
            else:
                s.provider.after_micro_backward(m, scale)
        if not empty:
            loss_sum = loss_sum + loss.detach().double() * m
            correct = correct + (out.detach().argmax(1) == y).sum()
    return loss_sum, correct


def _step_row(epoch: int, st: StepStats) -> dict[str, Any]:
    """One measured step as a steps.jsonl row: the sums and the estimates derived from them."""
    return {
        "epoch": epoch + 1, "step": st.step, "batch_size": st.batch_size,
        "sum_sq_norms": st.sum_sq_norms, "grad_sum_sq_norm": st.grad_sum_sq_norm,
        "small_batch_size": st.small_batch_size, "small_sq_norm": st.small_sq_norm,
        "trace_cov": st.trace_cov, "true_grad_sq_norm": st.true_grad_sq_norm,
        "estimator": st.estimator, "time_s": st.time_s,
    }


def _state(s: Setup, p: Progress, clock: Clock, epoch: int, n: int) -> PolicyState:
    d = p.decision
    return PolicyState(
        epoch=epoch, step=p.step, samples_seen=p.samples_seen,
        train_time_s=clock.train_time_s, dataset_size=n,
        batch_size=d.batch_size if d else s.policy.ctx.initial_batch_size,
        lr=p.lr, lr_multiplier=d.lr_multiplier if d else 1.0,
        last_eval=p.last_eval, stats=p.stats, step_stats=p.step_stats,
    )

