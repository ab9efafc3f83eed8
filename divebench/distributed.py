"""Data-parallel runs on PyTorch's own engine: torchrun (torch.distributed.elastic) starts
the processes, ``torch.distributed`` connects them (NCCL on CUDA, gloo on CPU), and
``DistributedDataParallel`` all-reduces the gradients.

A run is distributed when torchrun's ``WORLD_SIZE`` is above 1; one process (plain
``divebench run``, or torchrun with one process) takes none of these paths and pays
nothing for them. Semantics (the README's "Scaling out" says the same):

- The policy decides the *global* logical batch B. Every rank draws the same seeded
  permutation; batch t's B indices are cut into W contiguous slices
  (``tensor_split``: sizes differ by at most one) and rank r trains on slice r,
  micro-batched as one process would. Each rank scales its micro-batch losses by
  W·m/B, so DDP's average over ranks gives exactly the global batch's mean gradient.
  A rank whose slice is empty (B < W, a ragged last batch) runs one sample with its loss
  multiplied by 0, so every rank joins the same collectives.
- Decisions: every rank runs the policy from the same state, and rank 0's decision is
  broadcast (the state holds a time, which differs per rank: a time-based rule could
  otherwise split the ranks).
- Statistics: ``exact`` sums each rank's Σ_i ||g_i||² over ranks in float64 (all-reduce);
  ||Σ_i g_i||² comes from the all-reduced gradient. ``epoch`` reads only the all-reduced
  gradient, so it is the one-process estimator unchanged. ``microbatch`` is refused: its
  micro-batch gradients are local until DDP's all-reduce and no definition was chosen yet.
- BatchNorm: each rank normalises with its local batch's statistics (standard DDP);
  buffers are broadcast from rank 0 at every forward (DDP's default). The ``exact``
  per-sample BN terms are those of each rank's local BN batch.
- Evaluation runs on every rank over the whole validation split (identical results, no
  communication); training loss and accuracy are all-reduced; the clock reports the
  slowest rank's training time (all-reduce MAX at each epoch's end).
- One writer: rank 0 creates the run folder and broadcasts its id; only rank 0 writes
  files, checkpoints and the report; every rank reads the checkpoint to resume (the
  results folder must be shared, as it is on one machine).
- Signals: a SIGTERM/SIGINT on any rank is agreed at the next step boundary (an
  all-reduce MAX of a flag every step), so every rank stops at the same step.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn


@dataclass
class Dist:
    """This process's place in the group."""

    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce SUM in place (float64 sums stay float64)."""
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        return t

    def max_floats(self, xs: list[float]) -> list[float]:
        """The largest value over ranks of each entry."""
        t = torch.tensor(xs, dtype=torch.float64, device=self.device)
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return [float(v) for v in t.tolist()]

    def any(self, flag: int) -> int:
        """The largest ``flag`` over ranks (0 when none is set)."""
        t = torch.tensor([flag], dtype=torch.int64, device=self.device)
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return int(t.item())


def world_size_from_env() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


_DIST: Dist | None = None


def setup(device: torch.device, timeout_s: float = 120.0) -> Dist | None:
    """Join torchrun's group (once per process); None for a one-process run."""
    global _DIST
    if _DIST is not None:
        return _DIST
    if world_size_from_env() <= 1:
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not tdist.is_initialized():
        tdist.init_process_group(backend=backend, timeout=dt.timedelta(seconds=timeout_s))
    _DIST = Dist(tdist.get_rank(), tdist.get_world_size(), local_rank, device)
    return _DIST


def current() -> Dist | None:
    return _DIST


def wrap(module: nn.Module, d: Dist) -> nn.Module:
    """DistributedDataParallel around the (statistics-wrapped) model."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [d.device.index] if d.device.type == "cuda" else None
    return DDP(module, device_ids=ids, forward_sync_buffers=True)


def unwrap_ddp(module: nn.Module) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel as DDP

    return module.module if isinstance(module, DDP) else module


def is_group_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed because a peer is gone (gloo's
    connection errors, NCCL's, torch.distributed's own error types)."""
    if isinstance(exc, (tdist.DistError,)):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        k in text for k in ("gloo", "Gloo", "NCCL", "Connection reset by peer", "Connection closed by peer"))


def shutdown(clean: bool = True) -> None:
    """Leave the group: a barrier (so no rank tears its connections down while another
    still talks) and destroy_process_group; ``clean=False`` skips the barrier (a peer
    may be gone)."""
    global _DIST
    if _DIST is None or not tdist.is_initialized():
        return
    try:
        if clean:
            tdist.barrier()
    finally:
        tdist.destroy_process_group()
        _DIST = None
