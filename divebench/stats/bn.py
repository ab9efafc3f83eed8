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

    Why not a second, eval-mode forward/backward: BackPACK decides a BatchNorm
    layer's mode when its backward runs (``batch_norm_raise_error_if_train`` in the
    backward hook, running statistics read in ``_get_normalized_input_and_var``),
    so switching to eval mode after the train-mode forward changes only the BN
    weight term, and the conv/linear terms stay consistent with the batch gradient,
    as the authors' description has it. An extra eval-mode pass would instead
    change every term (they would be gradients of a different network).

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


def _flatten(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``t`` (n, C, *spatial) as (n, S, C) when ``channels_last``, else (n, C, S); a view
    of a tensor in that layout (a reshape across the layout would copy the activation)."""
    n, c = t.shape[:2]
    return t.movedim(1, -1).reshape(n, -1, c) if channels_last else t.reshape(n, c, -1)


def _sum_positions(a: torch.Tensor, b: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """Σ_s a·b per (sample, channel) of two flattened tensors: (n, C).

    (n, C, S): one batched multiply-reduce (einsum). (n, S, C): multiply, then sum over
    S; einsum would first permute both inputs to (n, C, S) copies, which took 2.2× as
    long on a (128, 64, 32, 32) channels_last input on 2 CPU cores.
    """
    if channels_last:
        return (a * b).sum(dim=1)
    return torch.einsum("ncs,ncs->nc", a, b)


def _batch_moments(
    x: torch.Tensor, eps: float, channels_last: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """x − batch mean per channel, and 1/sqrt(biased variance + eps), for a flattened x.

    Two passes (mean, then the centred second moment) in float32 over each sample's S
    positions, combined over samples in float64. ``torch.var_mean`` alone took longer
    than BatchNorm's own forward on one CPU core; with this the whole sampler took
    42 ms instead of 106 ms on a (512, 16, 32, 32) input.
    """
    sdim = 1 if channels_last else 2
    count = x.shape[0] * x.shape[sdim]
    mean = x.sum(dim=sdim).to(torch.float64).sum(dim=0) / count
    centred = x - _per_channel(mean.to(x.dtype), channels_last)
    var = _sum_positions(centred, centred, channels_last).to(torch.float64).sum(dim=0) / count
    return centred, (var + eps).rsqrt()


def _per_channel(v: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """A (C,) vector shaped to broadcast against a flattened tensor."""
    return v[None, None, :] if channels_last else v[None, :, None]


def _is_channels_last(t: torch.Tensor) -> bool:
    """True for a 4-D/5-D tensor laid out channels-last and not also NCHW-contiguous."""
    if t.dim() == 4:
        fmt = torch.channels_last
    elif t.dim() == 5:
        fmt = torch.channels_last_3d
    else:
        return False
    return t.is_contiguous(memory_format=fmt) and not t.is_contiguous()


@register_grad_sampler(list(_BN_TYPES))
def compute_batch_norm_grad_sample(
    layer: nn.modules.batchnorm._BatchNorm,
    activations: list[torch.Tensor],
    backprops: torch.Tensor,
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample terms of a BatchNorm layer's weight and bias (see the module doc).

    ``activations[0]`` is the layer's input as captured in the forward pass (the very
    batch whose statistics normalised it); ``backprops`` is δ, the gradient w.r.t. the
    layer's output, scaled as the caller chose (Opacus multiplies it by the batch size
    for a mean-reduced loss). The terms are linear in ``backprops``. Inputs in the
    channels_last layout are reduced in that layout, without a copy.
    """
    x = activations[0]
    if backprops.dtype in (torch.float16, torch.bfloat16):
        backprops = backprops.float()  # half precision (autocast): reduce in float32
    if x.dtype != backprops.dtype:
        x = x.to(backprops.dtype)
    cl = _is_channels_last(x) and _is_channels_last(backprops)
    x = _flatten(x, cl)
    d = _flatten(backprops, cl)
    sdim = 1 if cl else 2
    out: dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight is not None and layer.weight.requires_grad:
        have_running = layer.running_mean is not None and layer.running_var is not None
        if bn_mode_of(layer) == "paper" and have_running:
            centred = x - _per_channel(layer.running_mean.to(x.dtype), cl)
            rstd = (layer.running_var.to(torch.float64) + layer.eps).rsqrt()
        else:
            centred, rstd = _batch_moments(x, layer.eps, cl)
        # Σ_s δ·x̂ = rstd_c · Σ_s δ·(x − μ_c): one multiply-reduce, no x̂ tensor.
        out[layer.weight] = _sum_positions(d, centred, cl) * rstd.to(x.dtype)
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = d.sum(dim=sdim)
    return out
