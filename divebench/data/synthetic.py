"""Data sources that run anywhere: a synthetic linear problem and MNIST-1D.

Both are generated on the machine (never downloaded) from a fixed data seed, so every
policy and every run seed of a suite sees the same dataset; the run seed only changes
initialisation, order and augmentation.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from divebench.data.base import DataBundle

DATA_SEED = 20240917  # fixed: the dataset is part of the suite, not of the run


def _apply_subset(x: torch.Tensor, y: torch.Tensor, subset: int) -> tuple[torch.Tensor, torch.Tensor]:
    return (x[:subset], y[:subset]) if subset else (x, y)


def build_synthetic(options: dict[str, Any], device: torch.device, seed: int) -> DataBundle:
    """Logistic-regression data, the shape of the DiveBatch authors' synthetic prototype:
    features uniform in [-1, 1]^d, labels from the sign of a random Gaussian linear model
    plus small noise; d = 512, n = 20,000 by default, split 70/15/15."""
    n = int(options.get("n_samples") or 20_000)
    d = 512
    g = torch.Generator().manual_seed(DATA_SEED)
    x = torch.rand(n, d, generator=g) * 2 - 1
    w = torch.randn(d, generator=g)
    logits = x @ w / d**0.5 + 0.05 * torch.randn(n, generator=g)
    y = (logits > 0).long()
    n_train, n_val = int(0.7 * n), int(0.15 * n)
    xt, yt = _apply_subset(x[:n_train], y[:n_train], int(options.get("subset") or 0))
    return DataBundle(
        x_train=xt.to(device), y_train=yt.to(device),
        x_val=x[n_train : n_train + n_val].to(device), y_val=y[n_train : n_train + n_val].to(device),
        x_test=x[n_train + n_val :].to(device), y_test=y[n_train + n_val :].to(device),
        num_classes=2, input_shape=(d,),
        info={"source": "synthetic", "n_samples": n, "dim": d, "data_seed": DATA_SEED},
    )


def build_mnist1d(options: dict[str, Any], device: torch.device, seed: int) -> DataBundle:
    """MNIST-1D (Greydanus 2020) generated offline by ``mnist1d.data.make_dataset``
    (its downloading ``get_dataset`` is never called). Default 5,000 samples: 4,000
    train, 1,000 test (the test split is the validation split, as in the paper's tables)."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = int(options.get("n_samples") or 5000)
    args.seed = 42  # the package's published default: the standard MNIST-1D
    data = make_dataset(args)
    x = torch.as_tensor(np.asarray(data["x"]), dtype=torch.float32)
    y = torch.as_tensor(np.asarray(data["y"]), dtype=torch.long)
    xt, yt = _apply_subset(x, y, int(options.get("subset") or 0))
    return DataBundle(
        x_train=xt.to(device), y_train=yt.to(device),
        x_val=torch.as_tensor(np.asarray(data["x_test"]), dtype=torch.float32).to(device),
        y_val=torch.as_tensor(np.asarray(data["y_test"]), dtype=torch.long).to(device),
        num_classes=10, input_shape=(int(x.shape[1]),),
        info={"source": "mnist1d.make_dataset", "n_samples": args.num_samples, "data_seed": args.seed},
    )
