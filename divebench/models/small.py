"""Small models for the suites that run anywhere (and for benchmarks)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def build_logreg(num_classes: int, input_shape: tuple[int, ...], options: dict[str, Any]) -> nn.Module:
    """Multinomial logistic regression (one linear layer)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))


def build_mlp(num_classes: int, input_shape: tuple[int, ...], options: dict[str, Any]) -> nn.Module:
    """MNIST-1D's MLP baseline: two hidden layers of 100 ReLU units."""
    width = 100
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), width), nn.ReLU(),
        nn.Linear(width, width), nn.ReLU(),
        nn.Linear(width, num_classes),
    )


class MNIST1DCNN(nn.Module):
    """MNIST-1D's CNN baseline (Greydanus 2020): three strided 1-D convolutions of 25
    channels and a linear head; about 94% test accuracy in the paper."""

    def __init__(self, num_classes: int, length: int, channels: int = 25) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(1, channels, 5, stride=2, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        out_len = length
        for k in (5, 3, 3):
            out_len = (out_len + 2 - k) // 2 + 1
        self.linear = nn.Linear(channels * out_len, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.view(x.shape[0], 1, x.shape[-1])
        h = self.conv1(h).relu()
        h = self.conv2(h).relu()
        h = self.conv3(h).relu()
        return self.linear(h.flatten(1))


def build_mnist1d_cnn(num_classes: int, input_shape: tuple[int, ...], options: dict[str, Any]) -> nn.Module:
    return MNIST1DCNN(num_classes, input_shape[-1])


def build_small_cnn(num_classes: int, input_shape: tuple[int, ...], options: dict[str, Any]) -> nn.Module:
    """A small image CNN with BatchNorm (CIFAR-shaped smoke tests and benchmarks)."""
    c = input_shape[0]

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]

    return nn.Sequential(*block(c, 32), *block(32, 64), *block(64, 128),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_classes))
