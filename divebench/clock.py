"""The clock: timed training, untimed evaluation and bookkeeping (rules from AlgoPerf).

Timed (``train``): data selection and augmentation, forward, backward, optimiser step,
policy decisions and gradient-statistics work. Untimed: ``eval`` (evaluation) and
``other`` (logging, writing results, checkpointing, set-up). On CUDA the device is
synchronised before every clock read, so queued kernels are charged to the region that
launched them. ``wall_time_s`` is measured independently of the regions; a test checks
that the three regions add up to it, i.e. that no work escapes the instrumentation.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

REGIONS = ("train", "eval", "other")


class Clock:
    def __init__(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        self.totals_s = dict.fromkeys(REGIONS, 0.0)
        self._wall_offset_s = 0.0  # wall time of earlier segments (resume)
        self._start = self._now()
        self._active: str | None = None

    def _now(self) -> float:
        if self._cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    @contextmanager
    def region(self, name: str) -> Iterator[None]:
        """Charge the time spent inside the block to region ``name``. Not re-entrant:
        nesting would count time twice, so it is refused."""
        if name not in REGIONS:
            raise ValueError(f"unknown clock region {name!r}; expected one of {REGIONS}")
        if self._active is not None:
            raise RuntimeError(f"clock region {name!r} opened inside {self._active!r}")
        self._active = name
        t0 = self._now()
        try:
            yield
        finally:
            self.totals_s[name] += self._now() - t0
            self._active = None

    @property
    def train_time_s(self) -> float:
        return self.totals_s["train"]

    @property
    def eval_time_s(self) -> float:
        return self.totals_s["eval"]

    @property
    def other_time_s(self) -> float:
        return self.totals_s["other"]

    @property
    def wall_time_s(self) -> float:
        return self._wall_offset_s + (time.perf_counter() - self._start)

    def state_dict(self) -> dict[str, float]:
        return {**self.totals_s, "wall": self.wall_time_s}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Continue from a checkpoint: totals carry over, wall time continues from it."""
        for r in REGIONS:
            self.totals_s[r] = float(state[r])
        self._wall_offset_s = float(state["wall"])
        self._start = time.perf_counter()
