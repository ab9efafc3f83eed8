"""Per-sample gradients of BatchNorm's affine parameters, as an Opacus grad sampler.

A train-mode BatchNorm layer normalises each sample with the statistics of the whole
batch, so "the gradient of sample i's loss" is not defined for the layers that feed
it, and Opacus, torch.func and BackPACK all refuse it. divebench offers two precise
definitions, chosen per run with ``bn=contribution | paper``. Both share everything
except the BN *weight* term.

Notation for one BN layer in a batch (or micro-batch) of m samples: x_i its input for
sample i (C channels, any spatial positions s), δ_i = ∂L/∂y_i the gradient of the
step's loss L with respect to the layer's output for sample i, taken in the ordinary
train-mode autograd graph (so it carries the coupling of later BN layers), rescaled so
that a mean-reduced loss counts each sample once (Opacus multiplies by m).

``contribution`` (the default, divebench's definition)
    The batch gradient of every parameter is a sum over samples of one term per
    sample; g_i is sample i's term. For BN:
    x̂_i = (x_i − μ_B) / sqrt(σ²_B + eps) with μ_B, σ²_B the mean and *biased*
    variance over the batch the layer saw (exactly what BN uses in train mode), and
    g_i(γ) = Σ_s δ_i,s · x̂_i,s,   g_i(β) = Σ_s δ_i,s.
    Conv/linear layers use Opacus' own per-sample terms, which are the same kind of
    term (activation × δ_i). Hence Σ_i g_i equals m · (batch mean gradient) exactly,
    for every parameter. Equivalently: give every sample its own copy of every
    parameter in one train-mode batch graph; g_i is the gradient w.r.t. sample i's
    copy (:mod:`divebench.stats.reference` computes it that way).

``paper`` (the authors' variant)
    The authors ran the forward pass in train mode and the per-sample backward
    (BackPACK ``BatchL2Grad``) with the BN layers switched to eval mode in between.
    The autograd graph, hence δ_i, ``p.grad``, and every conv/linear term and the BN
    bias term, stay those of the train-mode graph; only the BN weight term is formed
    from the running statistics as they stand at backward time, i.e. already updated
    by this forward:
    g_i(γ) = Σ_s δ_i,s · (x_i,s − running_mean) / sqrt(running_var + eps).
    These BN weight terms no longer sum to the batch gradient (the approximation
    the authors accepted). A layer that tracks no running statistics falls back to
    the contribution term. One forward and one backward per micro-batch, as in
    ``contribution``: the mode costs nothing extra.

The sampler is registered with ``opacus.grad_sample.register_grad_sampler`` for
``BatchNorm1d/2d/3d`` on import (process-wide, as Opacus' registry is). The mode is
read from each layer (:func:`set_bn_mode`); layers never marked use ``contribution``.
"""

from __future__ import annotations

from typing import Literal

import torch
from opacus.grad_sample import register_grad_sampler
from torch import nn

BNMode = Literal["contribution", "paper"]
BN_MODES: tuple[str, ...] = ("contribution", "paper")

_MODE_ATTR = "_divebench_bn_mode"
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def set_bn_mode(model: nn.Module, mode: str) -> int:
    """Mark every BatchNorm layer of ``model`` with ``mode``; return how many were marked."""
    if mode not in BN_MODES:
        raise ValueError(f"bn={mode!r} is not a BatchNorm mode; expected one of {BN_MODES}")
    count = 0
    for module in model.modules():
        if isinstance(module, _BN_TYPES):
            # A plain attribute (not a buffer): it must not enter the state_dict.
            object.__setattr__(module, _MODE_ATTR, mode)
            count += 1
    return count


def bn_mode_of(layer: nn.Module) -> str:
    """The mode a BatchNorm layer is marked with (``contribution`` when unmarked)."""
    return getattr(layer, _MODE_ATTR, "contribution")


def normalised_input(
    layer: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, mode: str
) -> torch.Tensor:
    """x̂ of the given definition for the layer's input ``x`` (shape N, C, ...)."""
    shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
    have_running = layer.running_mean is not None and layer.running_var is not None
    if mode == "paper" and have_running:
        mean = layer.running_mean.to(x.dtype).view(shape)
        var = layer.running_var.to(x.dtype).view(shape)
    else:
        dims = [0] + list(range(2, x.dim()))
        # Biased variance over batch and positions: what F.batch_norm normalises by.
        var, mean = torch.var_mean(x, dim=dims, correction=0, keepdim=True)
    return (x - mean) * torch.rsqrt(var + layer.eps)


@register_grad_sampler(list(_BN_TYPES))
def compute_batch_norm_grad_sample(
    layer: nn.modules.batchnorm._BatchNorm,
    activations: list[torch.Tensor],
    backprops: torch.Tensor,
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample terms of a BatchNorm layer's weight and bias (see the module doc).

    ``activations[0]`` is the layer's input as captured in the forward pass (the very
    batch whose statistics normalised it); ``backprops`` is δ, already rescaled by
    Opacus for the loss reduction.
    """
    x = activations[0].to(backprops.dtype)
    out: dict[nn.Parameter, torch.Tensor] = {}
    reduce_dims = list(range(2, x.dim()))
    if layer.weight is not None and layer.weight.requires_grad:
        x_hat = normalised_input(layer, x, bn_mode_of(layer))
        prod = backprops * x_hat
        out[layer.weight] = prod.sum(dim=reduce_dims) if reduce_dims else prod
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = backprops.sum(dim=reduce_dims) if reduce_dims else backprops
    return out
