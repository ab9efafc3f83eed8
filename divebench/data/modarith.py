"""Modular arithmetic (Power et al. 2022, "Grokking"): every equation a + b = c (mod p)
as a token sequence ``[a, b, =]`` with label c, generated on the machine.

All p² pairs are split once, by a fixed data seed, into a training fraction and the rest
(validation); every policy and run seed of a suite sees the same split. Tokens: the
residues 0..p-1 and ``=`` (token p), so the vocabulary has p + 1 tokens and there are p
classes.
"""

from __future__ import annotations

from typing import Any

import torch

from divebench.data.base import DataBundle

DATA_SEED = 20220110
MODULUS = 97  # Power et al.'s p
TRAIN_FRACTION = 0.5


def build_modarith(options: dict[str, Any], device: torch.device, seed: int) -> DataBundle:
    """a + b mod 97, half of the 9,409 equations for training (4,704), half to validate."""
    p = MODULUS
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    a, b = a.flatten(), b.flatten()
    x = torch.stack([a, b, torch.full_like(a, p)], dim=1)
    y = (a + b) % p
    order = torch.randperm(p * p, generator=torch.Generator().manual_seed(DATA_SEED))
    n_train = int(TRAIN_FRACTION * p * p)
    tr, va = order[:n_train], order[n_train:]
    subset = int(options.get("subset") or 0)
    if subset:
        tr = tr[:subset]
    return DataBundle(
        x_train=x[tr].to(device), y_train=y[tr].to(device),
        x_val=x[va].to(device), y_val=y[va].to(device),
        num_classes=p, input_shape=(3,),
        info={"source": "modarith", "modulus": p, "train_fraction": TRAIN_FRACTION, "data_seed": DATA_SEED},
    )
