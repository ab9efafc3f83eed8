"""Batches of any size from one seeded permutation of device-resident data.

Each epoch draws one permutation of the training indices from a generator seeded by
(run seed, epoch), so the order of an epoch does not depend on what happened before
(resuming mid-epoch reproduces it). A batch is the next ``batch_size`` indices of the
permutation; the epoch ends when the permutation is used up, the last batch being
ragged when ``batch_size`` does not divide n. Changing the batch size rebuilds nothing.
"""

from __future__ import annotations

from typing import Any

import torch


class PermutationSampler:
    def __init__(self, n: int, seed: int, device: torch.device) -> None:
        self.n = n
        self.seed = seed
        self.device = device
        self.epoch = -1
        self.pos = 0
        self._perm: torch.Tensor | None = None

    def start_epoch(self, epoch: int) -> None:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        self._perm = torch.randperm(self.n, generator=gen).to(self.device)
        self.epoch = epoch
        self.pos = 0

    def next_batch(self, batch_size: int) -> torch.Tensor | None:
        """Indices of the next batch (at most ``batch_size``), or None at epoch end."""
        assert self._perm is not None, "start_epoch() first"
        if self.pos >= self.n:
            return None
        idx = self._perm[self.pos : self.pos + batch_size]
        self.pos += int(idx.shape[0])
        return idx

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.start_epoch(int(state["epoch"]))
        self.pos = int(state["pos"])
