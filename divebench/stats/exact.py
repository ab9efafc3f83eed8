"""Exact per-sample squared gradient norms through Opacus, with one ordinary backward.

The model is wrapped in :class:`GhostNormModule`, a subclass of Opacus'
``GradSampleModuleFastGradientClipping`` (ghost norms, ``loss_reduction="mean"``,
``strict=False``), used *without* ``PrivacyEngine``: no clipping, no noise, no second
backward. During the loop's own ``(loss * m / B).backward()`` the hooks compute, layer
by layer, the per-sample gradient norms of that micro-batch:

- ``nn.Linear`` (and ``nn.Embedding``): Opacus' ghost norms, ||g_i||² = ||δ_i||²·||a_i||²
  for 2-D inputs, without ever forming g_i;
- ``nn.Conv1d``/``nn.Conv2d``: divebench's norm sampler (:func:`conv_norm_sample`):
  per-sample weight gradients (or their Gram form) from a strided view of the padded
  input, a bounded chunk of samples at a time, reduced to norms and dropped. Opacus'
  own conv sampler goes through ``F.unfold``, whose CPU kernel loops over samples:
  with it a measured MNIST-1D CNN epoch took 3-5× a plain one;
- BatchNorm (:mod:`divebench.stats.bn`), GroupNorm, LayerNorm and every other layer
  with a grad sampler registered with Opacus: that sampler's per-sample gradients,
  reduced to norms at once (:func:`norms_from_grad_sampler`);
- layers without a sampler: Opacus' torch.func fallback (``strict=False``).

The table lives on the module instance, so Opacus' process-wide registries are left
alone (except for the BatchNorm grad sampler, which :mod:`divebench.stats.bn`
registers with Opacus on purpose).

``p.grad`` is the ordinary autograd gradient: the hooks only read layer inputs and
output gradients (a test checks bitwise equality with plain training). The squared
norms are summed in float64 into Q = Σ_i ||g_i||²; the gradient sum S = Σ_t B_t·ḡ_t
is accumulated in float64 from ``p.grad`` after each logical batch (a ragged last
batch enters with its true size); Δ̂ = Q / ||S||² and n·Δ̂ with n the number of
samples the epoch saw.

Loss scaling: the loop multiplies a micro-batch's mean loss by ``loss_scale = m/B``.
The hooks see output gradients of (loss_scale/m)·Σ_i loss_i, so their norms are
(loss_scale/m)·||g_i||; the provider multiplies the micro-batch's sum of squares by
(m/loss_scale)² once (Opacus would instead multiply every output gradient by m).

Hooks: Opacus' stock plumbing uses full module backward hooks, which forbid in-place
operations on a hooked layer's output (torchvision's ResNet does ``relu_`` and
``out += identity`` on BatchNorm outputs). Here a forward hook puts a tensor hook on
the layer's output, closing over the detached input; the tensor hook runs the layer's
sampler. On epochs that measure nothing the forward hooks are removed altogether
(nothing per-sample runs or is kept) and re-attached when a measured epoch starts; the
wrapper itself stays in place. A layer run in eval mode during a measured epoch is
refused with an error naming it.

The invariant (checked on every measured forward and backward, not per layer type):
every trainable parameter that gets a gradient gets its per-sample norms from the
layer calls that use it, all its uses covered.

- After the forward, a walk of the autograd graph counts the edges into each
  parameter's AccumulateGrad node (one per direct use), over the whole graph and inside
  each hooked layer call (from its output back to its inputs). A parameter used by one
  call: that call's norms. Used by several calls (a weight shared by two layers, a
  tied embedding/output weight, a layer applied twice): its per-sample gradients from
  each call's grad sampler are summed per sample before the norm. Used anywhere else
  (``F.linear(x, child.weight)`` in a parent): refused, naming the parameter.
- In the backward, a layer's norm sampler that returns nothing for one of its
  parameters (Opacus' Linear ghost norm does so for inputs of 4+ dimensions) is
  replaced by the layer's grad sampler for that call; if that gives nothing: refused.
- After the backward, every parameter that autograd accumulated a gradient into
  (post-accumulate-grad hooks) must have norms (a parameter used only in the loss has
  none): else refused.
- A layer sampled by the torch.func fallback and called with more than one input
  (a mask, a key and a value) is refused: the fallback replays it with one input.
- ``nn.MultiheadAttention`` (:func:`attention_grad_sample`) and recurrent layers
  (:func:`recurrent_grad_sample`) are replayed per sample with all their inputs; a
  recurrent layer's outputs (output, h_n, c_n) are sampled after the backward, when
  every output's gradient is known. Attention dropout or dropout between recurrent
  layers is refused (a replay would draw other masks).

Refusals raise :class:`StatisticsRefused` (a ``NotImplementedError``) with one line;
the engine records the run as failed with that line, the suite goes on. Fixed here
rather than refused: ``nn.Embedding(padding_idx=...)`` (padding positions carry no
gradient) and ``nn.LayerNorm`` without weight or bias (:func:`layer_norm_grad_sample`).

State dict: the wrapper holds the model as ``_module``, so ``wrapped.state_dict()``
keys carry a ``_module.`` prefix. Save and load ``unwrap(wrapped).state_dict()``
(:func:`unwrap`) to keep checkpoints interchangeable with an unwrapped model.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.grad_sample.functorch import ft_compute_per_sample_gradient, prepare_layer
from opacus.utils.module_utils import trainable_modules
from torch import nn

from divebench.policy import GradStats, StepStats
from divebench.stats import bn as bn_sampler  # registers the BatchNorm grad sampler

_HUGE_NORM = 1e30  # ghost clipping's threshold; never reached, we never clip


def unwrap(module: nn.Module) -> nn.Module:
    """The user's model inside a provider's wrapper (the module itself if unwrapped)."""
    while isinstance(module, GradSampleModuleFastGradientClipping):
        module = module._module
    return module


def make_step_stats(
    batch_size: int, sum_sq_norms: float, grad_sum_sq_norm: float, p_sum: float, a_sum: float,
    estimator: str, step: int, time_s: float,
) -> StepStats:
    """Build :class:`StepStats` from the step's sums (P = Σ_j ||b_j·ĝ_j||², A = Σ_j b_j²
    over its small batches)."""
    return StepStats(
        batch_size=int(batch_size), sum_sq_norms=float(sum_sq_norms),
        grad_sum_sq_norm=float(grad_sum_sq_norm), small_batch_size=float(a_sum) / batch_size,
        small_sq_norm=float(p_sum) / a_sum if a_sum > 0 else math.nan, estimator=estimator,
        step=int(step), time_s=float(time_s),
    )


def make_grad_stats(
    sum_sq_norms: float, grad_sum_sq_norm: float, n_samples: int, estimator: str, time_s: float
) -> GradStats:
    """Build :class:`GradStats`; Δ̂ = Q/||S||² (inf when ||S||² = 0 < Q, NaN when both 0)."""
    if grad_sum_sq_norm > 0:
        diversity = sum_sq_norms / grad_sum_sq_norm
    elif sum_sq_norms > 0:
        diversity = math.inf
    else:
        diversity = math.nan
    return GradStats(
        sum_sq_norms=float(sum_sq_norms),
        grad_sum_sq_norm=float(grad_sum_sq_norm),
        n_samples=int(n_samples),
        diversity=float(diversity),
        n_diversity=float(n_samples * diversity),
        estimator=estimator,
        time_s=float(time_s),
    )


class GradientSum:
    """S = Σ_t B_t·ḡ_t over an epoch, one float64 tensor per parameter (lazily allocated)."""

    def __init__(self) -> None:
        self.sums: list[torch.Tensor] | None = None

    def add(self, params: list[nn.Parameter], batch_size: int) -> None:
        """Add ``batch_size · p.grad`` (p.grad holds the batch's mean gradient)."""
        if self.sums is None:
            self.sums = [torch.zeros_like(p, dtype=torch.float64) for p in params]
        pairs = [(s, p.grad) for s, p in zip(self.sums, params, strict=True) if p.grad is not None]
        if pairs:
            sums, grads = zip(*pairs, strict=True)
            torch._foreach_add_(list(sums), list(grads), alpha=float(batch_size))

    def sq_norm(self) -> torch.Tensor:
        """||S||² as a float64 scalar tensor."""
        if not self.sums:
            return torch.zeros((), dtype=torch.float64)
        return sq_norm_sum(self.sums)

    def state(self) -> list[torch.Tensor] | None:
        return None if self.sums is None else [s.detach().cpu().clone() for s in self.sums]

    def load(self, sums: list[torch.Tensor] | None, params: list[nn.Parameter]) -> None:
        self.sums = (
            None
            if sums is None
            else [
                s.to(device=p.device, dtype=torch.float64).clone()
                for s, p in zip(sums, params, strict=True)
            ]
        )


def sq_norm_sum(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Σ over tensors of their squared L2 norms, reduced in float64.

    Float32 ``vector_norm`` over tens of millions of elements drifts by percents on CPU
    (torch 2.14); asking for a float64 reduction avoids it at no extra allocation.
    """
    norms = torch._foreach_norm(tensors, 2, dtype=torch.float64)
    stacked = torch.stack(norms)
    return torch.dot(stacked, stacked)


# Per-sample conv work runs on chunks of samples whose input patches hold at most
# max(_CHUNK_ELEMENTS, the layer input's size) elements: patches are K× the input (9×
# for 3×3 kernels), so a whole batch at once could take several times the memory of
# the activations the backward already keeps. Bounded by the input's own size, the
# transient stays within what the layer already holds.
_CHUNK_ELEMENTS = 1 << 22

NormSampler = Callable[
    [nn.Module, list[torch.Tensor], torch.Tensor], dict[nn.Parameter, torch.Tensor]
]


def _row_norms(t: torch.Tensor) -> torch.Tensor:
    """L2 norm of each row; half-precision rows (autocast) are reduced in float32."""
    if t.dtype in (torch.float16, torch.bfloat16):
        return torch.linalg.vector_norm(t, dim=1, dtype=torch.float32)
    return torch.linalg.vector_norm(t, dim=1)


def _padded(layer: nn.Conv1d | nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    pad = layer._reversed_padding_repeated_twice
    if not any(pad):
        return x
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    return F.pad(x, pad, mode=mode)


def _patches(layer: nn.Conv1d | nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Input patches as a strided view (n, C, *positions, *kernel); copies only to pad."""
    spatial = x.dim() - 2
    win = _padded(layer, x)
    for i in range(spatial):
        k, st, d = layer.kernel_size[i], layer.stride[i], layer.dilation[i]
        win = win.unfold(2 + i, d * (k - 1) + 1, st)
    if any(d > 1 for d in layer.dilation):
        win = win[
            (slice(None),) * (2 + spatial) + tuple(slice(None, None, d) for d in layer.dilation)
        ]
    return win


def _patch_rows(layer: nn.Conv1d | nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Patches as a contiguous (n·G, Q, Cg·K): one row per output position.

    Contiguous on purpose: CPU ``bmm`` falls back to cloning every sample's matrix
    when handed the overlapping strided view (measured 5× slower).
    """
    n, spatial = x.shape[0], x.dim() - 2
    win = _patches(layer, x)
    q = math.prod(win.shape[2 : 2 + spatial])
    order = [0, *range(2, 2 + spatial), 1, *range(2 + spatial, 2 + 2 * spatial)]
    rows = win.permute(order).reshape(n, q, layer.groups, -1)
    return rows.transpose(1, 2).contiguous().reshape(n * layer.groups, q, -1)


def _patch_cols(layer: nn.Conv1d | nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Patches as a contiguous (n·G, Cg·K, Q): one column per output position."""
    n, spatial = x.shape[0], x.dim() - 2
    win = _patches(layer, x)
    q = math.prod(win.shape[2 : 2 + spatial])
    order = [0, 1, *range(2 + spatial, 2 + 2 * spatial), *range(2, 2 + spatial)]
    return win.permute(order).contiguous().reshape(n * layer.groups, -1, q)


def _out_grads(layer: nn.Conv1d | nn.Conv2d, b: torch.Tensor) -> torch.Tensor:
    """Output gradients as a contiguous (n·G, Og, Q)."""
    return b.contiguous().reshape(b.shape[0] * layer.groups, layer.out_channels // layer.groups, -1)


def _norms_matmul_rows(
    layer: nn.Conv1d | nn.Conv2d, x: torch.Tensor, b: torch.Tensor
) -> torch.Tensor:
    """g_i = δ_i (O×Q) · patches_i (Q×CK), one batched matmul; norms of g_i."""
    grad = torch.bmm(_out_grads(layer, b), _patch_rows(layer, x))
    return _row_norms(grad.reshape(x.shape[0], -1))


def _norms_matmul_cols(
    layer: nn.Conv1d | nn.Conv2d, x: torch.Tensor, b: torch.Tensor
) -> torch.Tensor:
    """g_iᵀ = patches_iᵀ (CK×Q) · δ_iᵀ (Q×O), the other memory layout of the same product."""
    grad = torch.bmm(_patch_cols(layer, x), _out_grads(layer, b).transpose(1, 2))
    return _row_norms(grad.reshape(x.shape[0], -1))


def _norms_ghost(layer: nn.Conv1d | nn.Conv2d, x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||g_i||² = <δ_iᵀδ_i, P_iP_iᵀ> over positions (ghost norm): cheap when Q is small."""
    rows = _patch_rows(layer, x)  # (nG, Q, CK)
    d = _out_grads(layer, b)  # (nG, O, Q)
    gram_a = torch.bmm(rows, rows.transpose(1, 2))
    gram_b = torch.bmm(d.transpose(1, 2), d)
    acc = torch.promote_types(gram_a.dtype, torch.float32)  # half precision sums in fp32
    sq = (gram_a * gram_b).reshape(x.shape[0], -1).sum(dim=1, dtype=acc)
    return sq.clamp(min=0).sqrt()


def _norms_grouped(layer: nn.Conv1d | nn.Conv2d, x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """g_i from one weight-gradient convolution with a group per sample."""
    n, groups = x.shape[0], layer.groups
    zero_pad = layer.padding_mode == "zeros" and not isinstance(layer.padding, str)
    xin = x if zero_pad else _padded(layer, x)
    padding = list(layer.padding) if zero_pad else [0] * (x.dim() - 2)
    shape = (n * layer.out_channels, layer.in_channels // groups, *layer.kernel_size)
    weight = x.new_empty(1).expand(shape)  # only its shape is read
    grad = torch.ops.aten.convolution_backward(
        b.reshape(1, -1, *b.shape[2:]),
        xin.reshape(1, -1, *xin.shape[2:]),
        weight,
        None,
        list(layer.stride),
        padding,
        list(layer.dilation),
        False,
        [0] * (x.dim() - 2),
        n * groups,
        [False, True, False],
    )[1]
    return _row_norms(grad.reshape(n, -1))


_CONV_STRATEGIES = {
    "matmul_rows": _norms_matmul_rows,
    "matmul_cols": _norms_matmul_cols,
    "ghost": _norms_ghost,
    "grouped": _norms_grouped,
}
_CHOICE_ATTR = "_divebench_conv_strategy"  # per-layer cache: shape key -> strategy name


def _time_once(fn: Callable[[], torch.Tensor], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _conv_strategy(layer: nn.Conv1d | nn.Conv2d, x: torch.Tensor, b: torch.Tensor) -> str:
    """The fastest strategy for this layer and chunk shape, timed once per shape.

    None wins everywhere (CPU small-matrix batched matmuls loop over samples, oneDNN's
    grouped convolution does not). On 1 CPU core at batch 512, MNIST-1D CNN layers
    took 0.49/1.14/0.55 ms with the best strategy and 1.26/1.84/1.53 ms with the worst;
    a 32->64-channel 16x16 conv at batch 128 took 58 ms by one matmul layout and 20 ms
    grouped. All give the same norms up to float rounding. The choice is cached on the
    layer (a plain attribute, never in the state dict).
    """
    cache: dict[tuple[Any, ...], str] | None = layer.__dict__.get(_CHOICE_ATTR)
    if cache is None:
        cache = {}
        object.__setattr__(layer, _CHOICE_ATTR, cache)
    key = (x.shape, b.shape, x.dtype, x.device)
    choice = cache.get(key)
    if choice is None:
        best = math.inf
        for name, fn in _CONV_STRATEGIES.items():
            # The first call pays allocations and kernel selection; a strategy whose
            # first call is already far behind the best is not timed again.
            elapsed = _time_once(partial(fn, layer, x, b), x.device)
            if elapsed < 4 * best:
                elapsed = min(elapsed, _time_once(partial(fn, layer, x, b), x.device))
            if elapsed < best:
                best, choice = elapsed, name
        assert choice is not None
        cache[key] = choice
    return choice


def conv_norm_sample(
    layer: nn.Conv1d | nn.Conv2d, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradient norms of a Conv1d/Conv2d layer (Opacus norm-sampler signature).

    g_i(W)[o, c, κ] = Σ_q δ_i[o, q] · patch_i[c, q, κ] per group, for a bounded chunk of
    samples at a time, by whichever of four strategies was fastest for this shape
    (batched matmul in two layouts over a strided view of the padded input, ghost
    norms from two Gram matrices, a weight-gradient convolution with one group per
    sample); only the norms are kept.
    """
    x = activations[0]
    if x.dtype != backprops.dtype:
        x = x.to(backprops.dtype)
    n = x.shape[0]
    out: dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight.requires_grad:
        per_sample = max(1, x[0].numel() * math.prod(layer.kernel_size))
        chunk = max(1, max(_CHUNK_ELEMENTS, x.numel()) // per_sample)
        if chunk >= n:
            out[layer.weight] = _CONV_STRATEGIES[_conv_strategy(layer, x, backprops)](
                layer, x, backprops
            )
        else:
            norms = torch.empty(n, dtype=backprops.dtype, device=backprops.device)
            for start in range(0, n, chunk):
                xs, bs = x[start : start + chunk], backprops[start : start + chunk]
                strategy = _CONV_STRATEGIES[_conv_strategy(layer, xs, bs)]
                norms[start : start + chunk] = strategy(layer, xs, bs)
            out[layer.weight] = norms
    if layer.bias is not None and layer.bias.requires_grad:
        bias_grad = backprops.sum(dim=tuple(range(2, backprops.dim())))
        out[layer.bias] = _row_norms(bias_grad)
    return out


def norms_from_grad_sampler(grad_sampler: NormSampler) -> NormSampler:
    """A norm sampler that takes a grad sampler's per-sample gradients to norms at once."""

    def norm_sampler(
        layer: nn.Module, activations: list[torch.Tensor], backprops: torch.Tensor
    ) -> dict[nn.Parameter, torch.Tensor]:
        grads = grad_sampler(layer, activations, backprops)
        return {p: g.reshape(g.shape[0], -1).norm(dim=1) for p, g in grads.items()}

    return norm_sampler


def layer_norm_grad_sample(
    layer: nn.LayerNorm, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of ``nn.LayerNorm``, with or without its weight and bias
    (Opacus' sampler reads ``layer.bias.requires_grad`` and fails for ``bias=False``)."""
    x = activations[0].to(backprops.dtype)
    x_hat = F.layer_norm(x, layer.normalized_shape, eps=layer.eps)
    between = tuple(range(1, x.dim() - len(layer.normalized_shape)))
    out: dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight is not None and layer.weight.requires_grad:
        g = x_hat * backprops
        out[layer.weight] = g.sum(dim=between) if between else g
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = backprops.sum(dim=between) if between else backprops
    return out


def _node_edges(
    roots: list[Any], stop: set[Any]
) -> tuple[dict[torch.Tensor, int], set[Any]]:
    """Walk an autograd graph from ``roots`` (not past the nodes in ``stop``): how many
    graph edges reach each leaf's AccumulateGrad node (one per direct use of the leaf),
    and the nodes visited."""
    edges: dict[torch.Tensor, int] = {}
    seen: set[Any] = set(roots)
    todo = list(roots)
    while todo:
        node = todo.pop()
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            leaf = getattr(nxt, "variable", None)
            if leaf is not None:
                edges[leaf] = edges.get(leaf, 0) + 1
            elif nxt not in seen and nxt not in stop:
                seen.add(nxt)
                todo.append(nxt)
    return edges, seen


class _AttentionInputs:
    """The inputs of one ``nn.MultiheadAttention`` call (detached), for its replay."""

    __slots__ = ("query", "key", "value", "key_padding_mask", "attn_mask", "is_causal", "shape")

    def __init__(self, bound: dict[str, Any]) -> None:
        self.query = bound["query"].detach()
        self.key = bound["key"].detach()
        self.value = bound["value"].detach()
        kpm = bound.get("key_padding_mask")
        self.key_padding_mask = kpm.detach() if isinstance(kpm, torch.Tensor) else None
        mask = bound.get("attn_mask")
        self.attn_mask = mask.detach() if isinstance(mask, torch.Tensor) else None
        self.is_causal = bool(bound.get("is_causal", False))
        self.shape = self.query.shape  # (n, L, E): batch_first

    @property
    def dtype(self) -> torch.dtype:
        return self.query.dtype


def attention_grad_sample(
    layer: nn.MultiheadAttention, activations: list[Any], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of ``nn.MultiheadAttention`` (batch_first, no attention
    dropout, attention weights unused): the layer replayed one sample at a time under
    ``torch.func.vmap`` with its own query, key, value and key-padding mask, the gradient
    of <output_i, δ_i> for each sample i. Exact: each sample's output depends only on
    that sample's inputs (the mask, if any, is shared)."""
    from torch.func import functional_call, grad, vmap

    inp: _AttentionInputs = activations[0]
    trainable = {k: p for k, p in layer.named_parameters() if p.requires_grad}
    fixed = {k: p.detach() for k, p in layer.named_parameters() if not p.requires_grad}
    same_kv = inp.key is inp.query and inp.value is inp.query
    dtype = backprops.dtype

    def one(params: dict[str, torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            kpm: torch.Tensor | None, bp: torch.Tensor) -> torch.Tensor:
        q1 = q.unsqueeze(0)
        k1, v1 = (q1, q1) if same_kv else (k.unsqueeze(0), v.unsqueeze(0))
        out = functional_call(
            layer, {**params, **fixed}, (q1, k1, v1),
            {"key_padding_mask": None if kpm is None else kpm.unsqueeze(0), "need_weights": False,
             "attn_mask": inp.attn_mask, "is_causal": inp.is_causal},
        )[0]
        return (out * bp.unsqueeze(0)).sum()

    params = {k: p.detach().to(dtype) for k, p in trainable.items()}
    kpm_dim = None if inp.key_padding_mask is None else 0
    with warnings.catch_warnings():
        # torch has no vmap rule for CPU fused attention and loops over samples (said once
        # per call otherwise); mask-type deprecation notes repeat the caller's own
        warnings.filterwarnings("ignore", message=".*performance drop.*")
        warnings.filterwarnings("ignore", message=".*mismatched key_padding_mask.*")
        grads = vmap(grad(one), in_dims=(None, 0, 0, 0, kpm_dim, 0))(
            params, inp.query.to(dtype), inp.key.to(dtype), inp.value.to(dtype), inp.key_padding_mask,
            backprops,
        )
    return {trainable[k]: g for k, g in grads.items()}


def _attention_inputs(name: str, module: nn.MultiheadAttention, args: Any, kwargs: Any,
                      output: Any) -> _AttentionInputs:
    """The call's inputs, or a refusal naming what cannot be replayed exactly."""
    import inspect

    bound = inspect.signature(module.forward).bind(*args, **kwargs).arguments
    what = f"layer {name} (MultiheadAttention)"
    if not module.batch_first:
        raise StatisticsRefused(f"{what} has batch_first=False; per-sample norms need the batch first")
    if module.dropout > 0:
        raise StatisticsRefused(
            f"{what} has attention dropout {module.dropout} in training; its per-sample "
            "gradients replay the layer, which would draw other dropout masks: use dropout=0"
        )
    weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
    if isinstance(weights, torch.Tensor) and weights.requires_grad:
        raise StatisticsRefused(f"{what} returns attention weights that carry gradients; call it "
                                "with need_weights=False")
    mask = bound.get("attn_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() != 2:
        raise StatisticsRefused(f"{what} has a {mask.dim()}-D attn_mask; per-sample norms support "
                                "a 2-D mask shared by the batch (and key_padding_mask per sample)")
    return _AttentionInputs(bound)


class _RecurrentInputs:
    """The input and initial state of one recurrent layer call (detached)."""

    __slots__ = ("x", "hx", "shape")

    def __init__(self, x: torch.Tensor, hx: tuple[torch.Tensor, ...] | None) -> None:
        self.x, self.hx, self.shape = x, hx, x.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.x.dtype


def _store_grad(store: list[torch.Tensor | None], i: int, grad: torch.Tensor) -> None:
    store[i] = grad if store[i] is None else store[i] + grad


def _recurrent_inputs(name: str, module: nn.RNNBase, args: Any, kwargs: Any) -> _RecurrentInputs:
    what = f"layer {name} ({type(module).__name__})"
    x = args[0] if args else kwargs.get("input")
    if not isinstance(x, torch.Tensor):
        raise StatisticsRefused(f"{what} is called with a {type(x).__name__}; per-sample norms need a "
                                "padded batch tensor (no PackedSequence)")
    if not module.batch_first or x.dim() != 3:
        raise StatisticsRefused(f"{what} needs batch_first=True and a batched (n, T, features) input "
                                "for per-sample norms")
    if module.dropout > 0 and module.num_layers > 1:
        raise StatisticsRefused(f"{what} has dropout {module.dropout} between its layers; its per-sample "
                                "gradients replay it, which would draw other masks: use dropout=0")
    hx = args[1] if len(args) > 1 else kwargs.get("hx")
    if hx is not None:
        hx = tuple(t.detach() for t in (hx if isinstance(hx, tuple) else (hx,)))
    return _RecurrentInputs(x.detach(), hx)


def _recurrent_outputs(output: Any) -> list[torch.Tensor]:
    """(output, h_n) or (output, (h_n, c_n)), flattened."""
    out, state = output
    return [out, *(state if isinstance(state, tuple) else (state,))]


def recurrent_grad_sample(
    layer: nn.RNNBase, activations: list[Any], backprops: list[torch.Tensor | None]
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of ``nn.RNN``/``nn.GRU``/``nn.LSTM`` (batch_first): the layer
    replayed on one sample at a time (its own input and initial state; the batch is
    dimension 0 of the output and dimension 1 of h_n, c_n and hx), the gradient of
    Σ_k <output_k, δ_k> over the outputs that received gradients. Exact; costs a forward
    and backward of the layer per sample (torch.func's vmap has no rule for GRU/RNN)."""
    inp: _RecurrentInputs = activations[0]
    params = [p for p in layer.parameters() if p.requires_grad]
    n = inp.x.shape[0]
    dtype = next((g.dtype for g in backprops if g is not None), inp.x.dtype)
    out: list[list[torch.Tensor]] = [[] for _ in params]
    with torch.enable_grad():
        for i in range(n):
            hx = None
            if inp.hx is not None:
                hx_i = tuple(h[:, i : i + 1].to(dtype) for h in inp.hx)
                hx = hx_i if isinstance(layer, nn.LSTM) else hx_i[0]
            outs = _recurrent_outputs(layer(inp.x[i : i + 1].to(dtype), hx))
            total = torch.zeros((), dtype=dtype, device=inp.x.device)
            for k, (o, g) in enumerate(zip(outs, backprops, strict=True)):
                if g is not None:
                    g_i = g[i : i + 1] if k == 0 else g[:, i : i + 1]
                    total = total + (o * g_i).sum()
            grads = torch.autograd.grad(total, params, allow_unused=True)
            for j, (p, gp) in enumerate(zip(params, grads, strict=True)):
                out[j].append(torch.zeros_like(p) if gp is None else gp)
    return {p: torch.stack(gs) for p, gs in zip(params, out, strict=True)}


class _Call:
    """One application of a hooked layer in the current forward."""

    __slots__ = ("name", "module", "params", "sampler", "grad_sampler", "output_fns", "boundary", "live",
                 "accumulate", "edges", "deferred")

    def __init__(self, name: str, module: nn.Module, params: list[nn.Parameter], sampler: NormSampler,
                 grad_sampler: NormSampler, output_fns: list[Any], boundary: set[Any]) -> None:
        self.name, self.module, self.params = name, module, params
        self.sampler, self.grad_sampler = sampler, grad_sampler  # norms; per-sample gradients
        self.output_fns, self.boundary = output_fns, boundary
        # layers with several outputs (recurrent: output, h_n, c_n): their inputs and
        # output gradients, collected during the backward and sampled after it
        self.deferred: tuple[Any, list[torch.Tensor | None]] | None = None
        self.live: list[nn.Parameter] = list(params)  # the params this call gives gradient to
        self.accumulate: set[nn.Parameter] = set()  # params shared with other calls
        self.edges: dict[torch.Tensor, int] = {}


class StatisticsRefused(NotImplementedError):
    """The exact per-sample norms of this model cannot be trusted (the message says
    which parameter or layer, and why); no number is returned."""


class GhostNormModule(GradSampleModuleFastGradientClipping):
    """Opacus' ghost-norm module, with lean forward + tensor hooks of divebench's own.

    The per-layer mathematics is Opacus': its ghost norm samplers (Linear, Embedding),
    its grad samplers (GroupNorm, LayerNorm, ..., and the BatchNorm sampler that
    :mod:`divebench.stats.bn` registers with it) and its torch.func fallback, fed the
    layer input and the output gradient scaled as Opacus scales a mean-reduced loss
    (× the number of samples the layer saw); plus divebench's conv norm sampler.
    What differs is the plumbing: Opacus' full module backward hooks forbid in-place
    operations on a hooked layer's output (torchvision's ResNet does ``relu_`` and
    ``out += identity`` on BatchNorm outputs), and its capture hooks cost about 0.3 ms
    per step of Python on a 4-layer CNN. Here a forward hook puts a tensor hook on the
    layer's output, closing over the detached input; the tensor hook computes the
    layer's per-sample norms and appends them to :attr:`pending_norms`.
    """

    def add_hooks(
        self,
        *,
        loss_reduction: str = "mean",
        batch_first: bool = True,
        force_functorch: bool = False,
    ) -> None:
        # Called once by Opacus' constructor, which then sets hooks_enabled.
        if hasattr(self._module, "autograd_grad_sample_hooks"):
            raise ValueError("Trying to add hooks twice to the same model")
        if loss_reduction != "mean" or not batch_first:
            raise ValueError("GhostNormModule supports loss_reduction='mean', batch_first=True")
        self._module.autograd_grad_sample_hooks = []
        self.autograd_grad_sample_hooks = self._module.autograd_grad_sample_hooks
        self.hook_time_s = 0.0
        self.eval_mode_layers: set[str] = set()
        self.pending_norms: list[torch.Tensor] = []
        self._pending_params: list[nn.Parameter] = []
        # per parameter Σ_i (scaled) ||g_i||² since recording began; None: not recorded
        # (divebench check-stats sets a dict; the hooks' scale, see take_pending)
        self.record: dict[nn.Parameter, torch.Tensor] | None = None
        self.batch_sizes_seen: set[int] = set()
        self._calls: list[_Call] = []
        self._accum: dict[nn.Parameter, torch.Tensor] = {}
        self._delivered: set[nn.Parameter] = set()
        self._received: set[nn.Parameter] = set()
        self._param_hooks: list[Any] = []
        # Samplers per layer type, resolved now from Opacus' registries: its norm
        # samplers first, then its grad samplers reduced to norms, then ours for conv.
        grad_samplers: dict[type, NormSampler] = dict(self.GRAD_SAMPLERS)
        grad_samplers[nn.LayerNorm] = layer_norm_grad_sample
        table: dict[type, NormSampler] = {
            t: norms_from_grad_sampler(f) for t, f in grad_samplers.items()
        }
        table.update(GradSampleModuleFastGradientClipping.NORM_SAMPLERS)
        table[nn.Conv1d] = conv_norm_sample
        table[nn.Conv2d] = conv_norm_sample
        self.NORM_SAMPLERS = table
        fallback = norms_from_grad_sampler(ft_compute_per_sample_gradient)
        # layers replayed per sample with all their inputs (their whole subtree's params)
        replayed: dict[type, NormSampler] = {
            nn.MultiheadAttention: attention_grad_sample, nn.RNNBase: recurrent_grad_sample,
        }
        # name, module, norm sampler, grad sampler (per-sample gradients), whether the
        # torch.func fallback samples it (then it covers its children's parameters too)
        self._hooked: list[tuple[str, nn.Module, NormSampler, NormSampler, bool]] = []
        self._param_names: dict[nn.Parameter, str] = {}
        for pname, p in self._module.named_parameters(remove_duplicate=False):
            self._param_names[p] = (
                f"{self._param_names[p]} (= {pname})" if p in self._param_names else pname
            )
        self._covers: dict[nn.Module, list[nn.Parameter]] = {}
        names = {id(m): name for name, m in self._module.named_modules()}
        for module in self.iterate_submodules(self._module):
            functorch = force_functorch or type(module) not in self.GRAD_SAMPLERS
            replay = next((f for t, f in replayed.items() if isinstance(module, t)), None)
            if replay is not None:
                sampler, grad_sampler = norms_from_grad_sampler(replay), replay
            elif functorch:
                prepare_layer(module, batch_first=batch_first)
                sampler, grad_sampler = fallback, ft_compute_per_sample_gradient
            else:
                sampler = table.get(type(module), fallback)
                grad_sampler = grad_samplers[type(module)]
            name = names.get(id(module)) or "<model>"  # "" is the model itself
            self._covers[module] = list(module.parameters(recurse=functorch))
            self._hooked.append((name, module, sampler, grad_sampler, functorch))
        self.attach_hooks()

    def attach_hooks(self) -> None:
        """Register the forward hooks (no-op if attached)."""
        if self.autograd_grad_sample_hooks:
            return
        for name, module, sampler, grad_sampler, functorch in self._hooked:
            self.autograd_grad_sample_hooks.append(
                module.register_forward_hook(
                    partial(self._forward_hook, name, sampler, grad_sampler, functorch),
                    with_kwargs=True,
                )
            )
        self.autograd_grad_sample_hooks.append(
            self._module.register_forward_hook(self._root_forward_hook)
        )
        for p in self._param_names:
            if p.requires_grad:
                self._param_hooks.append(
                    p.register_post_accumulate_grad_hook(self._received.add)
                )

    def detach_hooks(self) -> None:
        """Remove the forward hooks: the model then runs exactly as unwrapped."""
        while self.autograd_grad_sample_hooks:
            self.autograd_grad_sample_hooks.pop().remove()
        while self._param_hooks:
            self._param_hooks.pop().remove()

    @property
    def hooks_attached(self) -> bool:
        return bool(self.autograd_grad_sample_hooks)

    def remove_hooks(self) -> None:
        self.disable_hooks()
        self.detach_hooks()
        if hasattr(self._module, "autograd_grad_sample_hooks"):
            delattr(self._module, "autograd_grad_sample_hooks")
        for _name, module in trainable_modules(self._module):
            if hasattr(module, "ft_compute_sample_grad"):
                delattr(module, "ft_compute_sample_grad")

    def take_pending(self) -> list[torch.Tensor]:
        """The per-sample norm vectors since the last call (one per parameter), after
        checking that every parameter that received a gradient got its norms."""
        for call in self._calls:
            if call.deferred is not None and any(g is not None for g in call.deferred[1]):
                self._sample_guarded(call, *call.deferred)
        for p, grads in self._accum.items():
            self.pending_norms.append(_row_norms(grads.reshape(grads.shape[0], -1)))
            self._pending_params.append(p)
            self._delivered.add(p)
        missing = self._received - self._delivered
        if self.record is not None:
            for p, n in zip(self._pending_params, self.pending_norms, strict=True):
                sq = n.double().square().sum()
                self.record[p] = self.record[p] + sq if p in self.record else sq
        norms, self.pending_norms = self.pending_norms, []
        self._forget_calls()
        if missing and self.hooks_enabled:
            p = min(missing, key=lambda q: self._param_names.get(q, ""))
            raise StatisticsRefused(
                f"parameter {self._param_names.get(p, '?')} received a gradient but no per-sample "
                "norms (used outside the forward of the layer that owns it, e.g. in the loss)"
            )
        return norms

    def discard_pending(self) -> None:
        """Forget everything collected since the last :meth:`take_pending`."""
        self.pending_norms = []
        self._forget_calls()

    def _forget_calls(self) -> None:
        # A call's tensor hook hangs on its output's graph node and holds the call: drop
        # the call's reference to that node, or the cycle keeps the layer inputs alive
        # until the garbage collector runs (measured: 2.4x the peak memory of an epoch).
        for call in self._calls:
            call.output_fns, call.boundary, call.deferred = [], set(), None
        self._calls, self._accum, self._pending_params = [], {}, []
        self._received.clear()  # cleared, not replaced: the parameters' hooks hold it
        self._delivered = set()
        self.batch_sizes_seen.clear()

    def _refuse(self, p: nn.Parameter, why: str) -> StatisticsRefused:
        self.discard_pending()
        return StatisticsRefused(
            f"parameter {self._param_names.get(p, '?')} {why}; exact per-sample norms refused "
            "(a number that may be wrong is not returned)"
        )

    def _forward_hook(
        self, name: str, sampler: NormSampler, grad_sampler: NormSampler, functorch: bool,
        module: nn.Module, args: Any, kwargs: Any, output: Any,
    ) -> None:
        if not self.hooks_enabled or not torch.is_grad_enabled():
            return
        if not module.training:
            # Its parameters would get gradients but no per-sample norms; the
            # provider refuses such an epoch (Opacus skips eval-mode layers too).
            self.eval_mode_layers.add(name)
            return
        if isinstance(module, nn.RNNBase):
            self._recurrent_call(name, module, sampler, grad_sampler, args, kwargs, output)
            return
        if isinstance(module, nn.MultiheadAttention):
            x_in: Any = _attention_inputs(name, module, args, kwargs, output)
            output = output[0]
            if not output.requires_grad:
                return
            boundary = {t.grad_fn for t in (*args, *kwargs.values())
                        if isinstance(t, torch.Tensor) and t.grad_fn is not None}
            self._register_call(name, module, output, boundary, sampler, grad_sampler, x_in)
            return
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            if isinstance(output, torch.Tensor):
                return  # no gradient will flow through this call
            raise StatisticsRefused(
                f"layer {name} ({type(module).__name__}) returns {type(output).__name__}; "
                "per-sample norms need layers that return one tensor"
            )
        if functorch and (len(args) != 1 or kwargs):
            raise StatisticsRefused(
                f"layer {name} ({type(module).__name__}) is called with {len(args)} positional and "
                f"{len(kwargs)} keyword inputs; its per-sample gradients (torch.func) replay it "
                "with one input"
            )
        x = args[0].detach()
        if isinstance(module, nn.Embedding):
            x = x.contiguous()  # Opacus' embedding norm sampler views the indices flat
        boundary = {t.grad_fn for t in args if isinstance(t, torch.Tensor) and t.grad_fn is not None}
        self._register_call(name, module, output, boundary, sampler, grad_sampler, x)

    def _recurrent_call(self, name: str, module: nn.RNNBase, sampler: NormSampler, grad_sampler: NormSampler,
                        args: Any, kwargs: Any, output: Any) -> None:
        x_in = _recurrent_inputs(name, module, args, kwargs)
        outs = _recurrent_outputs(output)
        live = [t for t in outs if t.requires_grad]
        if not live:
            return
        boundary = {t.grad_fn for t in (*args, *kwargs.values(), *(x_in.hx or ()))
                    if isinstance(t, torch.Tensor) and t.grad_fn is not None}
        params = [p for p in self._covers[module] if p.requires_grad]
        call = _Call(name, module, params, sampler, grad_sampler, [t.grad_fn for t in live], boundary)
        grads: list[torch.Tensor | None] = [None] * len(outs)
        call.deferred = (x_in, grads)
        self._calls.append(call)
        for i, t in enumerate(outs):
            if t.requires_grad:
                t.register_hook(partial(_store_grad, grads, i))

    def _register_call(self, name: str, module: nn.Module, output: torch.Tensor, boundary: set[Any],
                       sampler: NormSampler, grad_sampler: NormSampler, x: Any) -> None:
        params = [p for p in self._covers[module] if p.requires_grad]
        call = _Call(name, module, params, sampler, grad_sampler, [output.grad_fn], boundary)
        self._calls.append(call)
        output.register_hook(partial(self._output_grad_hook, call, x))

    def _root_forward_hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        """The invariant, checked on the finished forward graph: every trainable
        parameter the output depends on is used only inside the layer calls that give
        it per-sample norms. Used by one call: that call's norms. Used by several
        (a shared or tied parameter, a layer applied twice): their per-sample gradients
        are summed before the norm. Used anywhere else: refused."""
        if not self.hooks_enabled or not torch.is_grad_enabled() or self.eval_mode_layers:
            return  # (eval-mode layers: the provider refuses the epoch, naming them)

        if isinstance(output, dict):
            output = list(output.values())
        outs = [output] if isinstance(output, torch.Tensor) else [
            t for t in (output if isinstance(output, (tuple, list)) else []) if isinstance(t, torch.Tensor)
        ]
        roots = [t.grad_fn for t in outs if t.grad_fn is not None]
        if not roots:
            return
        start = time.perf_counter()
        total, reached = _node_edges(roots, set())
        owners: dict[nn.Parameter, list[_Call]] = {}
        for call in self._calls:
            if not any(fn in reached for fn in call.output_fns):
                call.live = []
                continue
            call.edges, _ = _node_edges(call.output_fns, call.boundary)
            call.live = [p for p in call.params if total.get(p, 0) > 0]
            for p in call.live:
                owners.setdefault(p, []).append(call)
        for call in self._calls:  # the walk is done: break the node -> hook -> call cycle
            call.output_fns, call.boundary = [], set()
        for leaf in self._param_names:  # in the model's order: the first offender is named
            n = total.get(leaf, 0)
            if n == 0:
                continue
            calls = owners.get(leaf, [])
            if not calls:
                raise self._refuse(
                    leaf, "gets a gradient outside the forward of every layer that gives "
                    "per-sample norms (used functionally, e.g. F.linear(x, weight) in a parent)"
                )
            inside = sum(c.edges.get(leaf, 0) for c in calls)
            if inside != n:
                raise self._refuse(
                    leaf, f"is used {n - inside} time(s) outside the forward of "
                    f"{', '.join(sorted({c.name for c in calls}))}"
                )
            if len(calls) > 1:
                for c in calls:
                    c.accumulate.add(leaf)
        self.__dict__["hook_time_s"] = self.hook_time_s + time.perf_counter() - start

    def _output_grad_hook(self, call: _Call, x: torch.Tensor, grad: torch.Tensor) -> None:
        start = time.perf_counter()
        module = call.module
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            # autograd gives the padding row no gradient: those positions contribute nothing
            grad = grad.masked_fill((x == module.padding_idx).unsqueeze(-1), 0)
        # Unscaled output gradient: Opacus would multiply it by the samples the layer saw
        # (mean-reduced loss); norms are linear in it, so the provider applies that
        # factor once per micro-batch instead (see ExactProvider.after_micro_backward).
        self._sample_guarded(call, x, grad)
        self.batch_sizes_seen.add(x.shape[0])
        self.__dict__["hook_time_s"] = self.hook_time_s + time.perf_counter() - start

    def _sample_guarded(self, call: _Call, x: Any, grad: Any) -> None:
        """:meth:`_sample` with the hooks off (a sampler may replay the layer, whose own
        forward must not be hooked) and a sampler's failure refused, naming the layer."""
        # plain attribute writes (nn.Module.__setattr__ costs ~6 µs a call, per layer per step)
        self.__dict__["hooks_enabled"] = False
        try:
            if call.sampler is conv_norm_sample or isinstance(call.module, nn.Linear):
                self._sample(call, x, grad)  # these samplers replay nothing and warn about nothing
            else:
                with warnings.catch_warnings():
                    # Opacus' torch.func fallback autocasts when inputs are token ids
                    # (another dtype than the weights) and says so on every call
                    warnings.filterwarnings("ignore", message=".*CPU autocast.*")
                    warnings.filterwarnings("ignore", message=".*performance drop.*")
                    self._sample(call, x, grad)
        except StatisticsRefused:
            raise
        except RuntimeError as exc:
            what = f"layer {call.name} ({type(call.module).__name__})"
            self.discard_pending()
            if "random" in str(exc):
                raise StatisticsRefused(
                    f"{what} uses random operations (dropout) in training: its per-sample gradients "
                    "replay it, which would draw other random numbers; use dropout=0 in it"
                ) from exc
            raise StatisticsRefused(f"{what}: its per-sample gradients failed: {str(exc).splitlines()[0]}") from exc
        finally:
            self.__dict__["hooks_enabled"] = True

    def _sample(self, call: _Call, x: Any, grad: Any) -> None:
        module = call.module
        single = [p for p in call.live if p not in call.accumulate]  # this call's norms alone
        norms = call.sampler(module, [x], grad) if single else {}
        missing = [p for p in single if p not in norms]
        if missing or call.accumulate:
            # Layers whose norm sampler gave nothing for a parameter (Opacus' Linear ghost
            # norm for inputs of 4 or more dimensions), and parameters shared between
            # calls: per-sample gradients, from the layer's grad sampler.
            grads = call.grad_sampler(module, [x], grad)
            for p in (*missing, *call.accumulate):
                if p not in grads:
                    raise self._refuse(p, f"got no per-sample gradient from layer {call.name} "
                                          f"({type(module).__name__})")
            for p in missing:
                norms[p] = _row_norms(grads[p].reshape(grads[p].shape[0], -1))
            for p in call.accumulate:
                g = grads[p]
                acc = self._accum.get(p)
                self._accum[p] = g.clone() if acc is None else acc + g
        for p in single:
            self.pending_norms.append(norms[p])
            self._pending_params.append(p)
            self._delivered.add(p)


class ExactProvider:
    """``estimator=exact``: Σ_i ||g_i||² from Opacus per-sample norms (see module doc).

    Args:
        bn: BatchNorm definition, ``contribution`` (default) or ``paper``
            (:mod:`divebench.stats.bn`).
    """

    name = "exact"

    def __init__(self, bn: str = "contribution") -> None:
        if bn not in bn_sampler.BN_MODES:
            raise ValueError(
                f"bn={bn!r} is not a BatchNorm mode; expected one of {bn_sampler.BN_MODES}"
            )
        self.bn = bn
        self._module: GhostNormModule | None = None
        self._params: list[nn.Parameter] = []
        self._measure = False
        self._step_scope = False  # set by the first start_step (stats_scope = "step")
        self._dist: Any = None  # divebench.distributed.Dist of a data-parallel run
        self._last_step: tuple[int, torch.Tensor, torch.Tensor] | None = None
        self._step_time0 = 0.0
        self._reset()

    # -- the StatsProvider protocol ---------------------------------------------------
    def wrap(self, model: nn.Module) -> nn.Module:
        """Wrap ``model`` in the ghost-norm module (hooks off until a measured epoch)."""
        if self._module is not None:
            raise RuntimeError("ExactProvider.wrap was already called; one provider per run")
        bn_sampler.set_bn_mode(model, self.bn)
        module = GhostNormModule(
            model,
            batch_first=True,
            loss_reduction="mean",
            strict=False,
            max_grad_norm=_HUGE_NORM,
            use_ghost_clipping=True,
        )
        module.disable_hooks()
        module.detach_hooks()
        self._module = module
        self._params = [p for p in model.parameters() if p.requires_grad]
        return module

    def min_micro_batches(self, batch_size: int) -> int:
        return 1

    def set_dist(self, dist: Any) -> None:
        """Data-parallel run: each rank's per-sample sums are all-reduced after every
        batch (p.grad is already DDP's all-reduced mean)."""
        self._dist = dist

    def record_per_parameter(self) -> dict[nn.Parameter, torch.Tensor]:
        """From now on, also keep Σ_i ||g_i||² per parameter (as the hooks see it:
        ``(loss_scale/m)²`` times the true value, see :meth:`after_micro_backward`) in
        the returned dict, which the caller reads and clears (``divebench check-stats``)."""
        module = self._require_module()
        module.record = {}
        return module.record

    def start_epoch(self, measure: bool, dataset_size: int) -> None:
        self._reset()
        self._set_measuring(measure)

    def after_micro_backward(self, micro_size: int, loss_scale: float) -> None:
        if not self._measure:
            return
        start = time.perf_counter()
        module = self._require_module()
        if module.eval_mode_layers:
            raise StatisticsRefused(
                "per-sample norms are undefined for layers run in eval mode during a measured "
                f"epoch (their parameters still train): {sorted(module.eval_mode_layers)}"
            )
        if module.batch_sizes_seen - {micro_size}:
            raise RuntimeError(
                f"a layer saw {sorted(module.batch_sizes_seen)} samples in a micro-batch of "
                f"{micro_size}; per-sample norms need the batch as the first dimension"
            )
        norms = module.take_pending()
        if norms:
            # The hooks' norms are ||∂(loss_scale·mean loss)/∂θ_i|| = (loss_scale/m)·||g_i||.
            factor = micro_size / loss_scale
            self._batch_sq += sq_norm_sum(norms) * (factor * factor)
        self._own_time_s += time.perf_counter() - start

    def after_batch(self, batch_size: int) -> None:
        if not self._measure:
            return
        start = time.perf_counter()
        if self._dist is not None:  # Σ_i ||g_i||² over every rank's slice (float64)
            self._dist.sum_(self._batch_sq)
        if self._step_scope:
            # the step's own sums; nothing is kept for the epoch
            grads = [p.grad for p in self._params if p.grad is not None]
            g_sq = sq_norm_sum(grads) * float(batch_size) ** 2 if grads else torch.zeros_like(self._batch_sq)
            self._last_step = (batch_size, self._batch_sq.clone(), g_sq)
        else:
            self._sum_sq += self._batch_sq
            self._grad_sum.add(self._params, batch_size)
            self._n_samples += batch_size
        self._batch_sq.zero_()
        self._own_time_s += time.perf_counter() - start

    def start_step(self, measure: bool) -> None:
        """Step scope: measure the coming step or not (hooks attached only while measuring)."""
        self._step_scope = True
        if measure != self._measure:
            self._set_measuring(measure)
        self._last_step = None
        self._step_time0 = self._own_time_s + self._hook_time()

    def end_step(self, step: int) -> StepStats | None:
        """The measured step's :class:`StepStats` (exact: small batches of one sample)."""
        if self._last_step is None:
            return None
        b, q, g_sq = self._last_step
        self._last_step = None
        q_f = float(q.item())
        own = self._own_time_s + self._hook_time() - self._step_time0
        return make_step_stats(b, q_f, float(g_sq.item()), q_f, float(b), self.name, step, own)

    def abort_batch(self) -> None:
        """Forget the current batch's micro-batches (the loop redoes it after an OOM)."""
        self._batch_sq.zero_()
        if self._module is not None:
            self._module.discard_pending()
            self._module.eval_mode_layers.clear()

    def end_epoch(self) -> GradStats | None:
        if not self._measure or self._step_scope:
            return None
        start = time.perf_counter()
        stats_q = float(self._sum_sq.item())
        s2 = float(self._grad_sum.sq_norm().item())
        own = self._own_time_s + time.perf_counter() - start + self._hook_time()
        stats = make_grad_stats(stats_q, s2, self._n_samples, self.name, own)
        self._set_measuring(False)
        self._reset()
        return stats

    def state_dict(self) -> dict[str, Any]:
        return {
            "measure": self._measure,
            "sum_sq_norms": float(self._sum_sq.item()),
            "grad_sum": self._grad_sum.state(),
            "n_samples": self._n_samples,
            "time_s": self._own_time_s + self._hook_time(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a mid-epoch state (call after :meth:`wrap`)."""
        self._reset()
        self._set_measuring(bool(state["measure"]))
        self._sum_sq.fill_(float(state["sum_sq_norms"]))
        self._grad_sum.load(state["grad_sum"], self._params)
        self._n_samples = int(state["n_samples"])
        self._own_time_s = float(state["time_s"])

    # -- internals ---------------------------------------------------------------------
    def _reset(self) -> None:
        device = self._params[0].device if self._params else torch.device("cpu")
        self._sum_sq = torch.zeros((), dtype=torch.float64, device=device)
        self._batch_sq = torch.zeros((), dtype=torch.float64, device=device)
        self._grad_sum = GradientSum()
        self._n_samples = 0
        self._own_time_s = 0.0
        if self._module is not None:
            self._module.hook_time_s = 0.0
            self._module.eval_mode_layers.clear()
            self._module.discard_pending()

    def _hook_time(self) -> float:
        return self._module.hook_time_s if self._module is not None else 0.0

    def _require_module(self) -> GhostNormModule:
        if self._module is None:
            raise RuntimeError("ExactProvider.wrap(model) must be called before training")
        return self._module

    def _set_measuring(self, measure: bool) -> None:
        module = self._require_module()
        self._measure = measure
        if measure:
            module.attach_hooks()
            module.enable_hooks()
        else:
            module.disable_hooks()
            module.detach_hooks()
            module.discard_pending()
