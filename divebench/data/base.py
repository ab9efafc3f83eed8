"""Device-resident datasets: the contract between data sources and the training loop.

A data source is a function ``build(options, device, seed) -> DataBundle`` registered
by name (hook ``divebench_datasets``). It loads or generates the whole split into
tensors *on the training device* once; the loop then draws batches of any size by
indexing (no DataLoader, nothing rebuilt when the batch size changes).

``x_train`` holds raw samples (uint8 images NCHW, or float features); the bundle's
``train_transform`` turns a raw batch into the model's float input with batched tensor
operations on the device (augmentation included; it draws randomness only from the
generator it is given, so runs are reproducible), and ``eval_transform`` does the
deterministic part (normalisation) for evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

TrainTransform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
EvalTransform = Callable[[torch.Tensor], torch.Tensor]


def _identity_train(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return x


def _identity_eval(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass
class DataBundle:
    """The splits of one dataset, resident on one device."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    num_classes: int
    input_shape: tuple[int, ...]  # shape of one transformed sample, e.g. (3, 32, 32)
    train_transform: TrainTransform = _identity_train
    eval_transform: EvalTransform = _identity_eval
    x_test: torch.Tensor | None = None
    y_test: torch.Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)  # provenance for env.json

    @property
    def train_size(self) -> int:
        return int(self.y_train.shape[0])


DataBuilder = Callable[[dict[str, Any], torch.device, int], DataBundle]


class DataError(Exception):
    """Data missing, unreadable or corrupt: a user-facing one-line message (exit 2)."""
