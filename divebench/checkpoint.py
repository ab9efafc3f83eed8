"""Checkpoints: everything needed to continue a run exactly where it stopped.

Written atomically before the first epoch of a fresh run, after every epoch, and at the
next step boundary after SIGTERM or SIGINT (then with the position inside the epoch). Holds the model, optimiser, policy
and statistics-provider state, the loop's progress, the clock totals and every RNG
(torch CPU and CUDA; the sampler's permutation is a function of (seed, epoch) and the
augmentation generator's state is stored). Resuming from an end-of-epoch checkpoint
replays the rest of the run bit for bit on the CPU, except the last digits of measured
gradient statistics: the exact provider picks each conv layer's computation by timing,
once per process, and equivalent computations round differently (seen: 1e-9 relative).
"""

from __future__ import annotations

import io
from typing import Any

import torch

from divebench.clock import Clock
from divebench.loop import Progress, Setup
from divebench.policy import Decision, EvalResult, GradStats, StepStats
from divebench.results import atomic_write_bytes

FILENAME = "checkpoint.pt"
VERSION = 1


def _model_state(setup: Setup) -> dict[str, Any]:
    from divebench.distributed import unwrap_ddp

    return dict(unwrap_ddp(setup.model).state_dict())  # the same keys with and without DDP


def save(path: Any, setup: Setup, p: Progress, clock: Clock, epoch_state: dict[str, Any] | None,
         folder: dict[str, Any] | None = None) -> None:
    """Write the checkpoint; ``folder`` is what the run folder holds at this point
    (:meth:`divebench.results.RunFolder.state`), checked again before a resume."""
    state = {
        "version": VERSION,
        "model": _model_state(setup),
        "optimizer": setup.optimizer.state_dict(),
        "policy": setup.policy.state_dict(),
        "provider": setup.provider.state_dict() if setup.provider is not None else None,
        "progress": {
            "epoch": p.epoch, "step": p.step, "samples_seen": p.samples_seen, "lr": p.lr,
            "last_eval": vars(p.last_eval) if p.last_eval else None,
            "stats": vars(p.stats) if p.stats else None,
            "step_stats": vars(p.step_stats) if p.step_stats else None,
            "decision": vars(p.decision) if p.decision else None,
        },
        "epoch_state": epoch_state,
        "folder": folder,
        "clock": clock.state_dict(),
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        },
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load(path: Any, device: torch.device) -> dict[str, Any]:
    return dict(torch.load(path, map_location=device, weights_only=False))


def restore(state: dict[str, Any], setup: Setup, clock: Clock) -> tuple[Progress, dict[str, Any] | None]:
    from divebench.distributed import unwrap_ddp

    unwrap_ddp(setup.model).load_state_dict(state["model"])
    setup.optimizer.load_state_dict(state["optimizer"])
    setup.policy.load_state_dict(state["policy"])
    if setup.provider is not None and state["provider"] is not None:
        setup.provider.load_state_dict(state["provider"])
    clock.load_state_dict(state["clock"])
    torch.set_rng_state(state["rng"]["torch"].cpu())
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["rng"]["cuda"]])
    pr = state["progress"]
    p = Progress(
        epoch=pr["epoch"], step=pr["step"], samples_seen=pr["samples_seen"], lr=pr["lr"],
        last_eval=EvalResult(**pr["last_eval"]) if pr["last_eval"] else None,
        stats=GradStats(**pr["stats"]) if pr["stats"] else None,
        step_stats=StepStats(**pr["step_stats"]) if pr.get("step_stats") else None,
        decision=Decision(**pr["decision"]) if pr["decision"] else None,
    )
    return p, state["epoch_state"]
