"""Slow float64 references for per-sample squared gradient norms (for tests).

Two independent ways, neither touching Opacus:

- :func:`loop_sq_norms`: one sample at a time, the gradient of that sample's loss,
  its squared norm. The textbook definition; refuses models with BatchNorm, where it
  does not match training (a batch of one has no batch statistics).
- :func:`contribution_sq_norms`: every sample gets its own zero-valued copy δ_i of
  every parameter, added where the parameter acts on that sample, in *one* train-mode
  batch graph; g_i = ∂(Σ_j loss_j)/∂δ_i is sample i's term of the batch gradient.
  For models without BatchNorm it equals the loop; with BatchNorm it is the
  ``contribution`` definition of :mod:`divebench.stats.bn`, and with
  ``bn="paper"`` the BN weight copy multiplies the running-statistics x̂ instead
  (the authors' variant). Supported layers: Linear, Conv1d/2d, BatchNorm1d/2d,
  GroupNorm; any other layer with parameters is refused.

Both work on a float64 deep copy: the model passed in is not modified, except that
:func:`contribution_sq_norms` returns the copy's batch gradient for checks.

:func:`drive_epoch` is the training loop of :mod:`divebench.stats.base`'s docstring in
a dozen lines, for tests and benchmarks that exercise providers without the engine.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from divebench.policy import GradStats, StepStats
from divebench.stats.base import StatsProvider

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_BN = (nn.BatchNorm1d, nn.BatchNorm2d)


def _float64_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).to(torch.float64)


def loop_sq_norms(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn = F.cross_entropy,
    by_param: dict[str, float] | None = None,
) -> torch.Tensor:
    """||∇ loss(x_i, y_i)||² for each sample, one sample at a time, in float64.

    ``by_param``, if given, receives Σ_i ||∂loss_i/∂θ||² per parameter name."""
    ref = _float64_copy(model)
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in ref.modules()):
        raise ValueError(
            "loop_sq_norms is undefined for BatchNorm models; use contribution_sq_norms"
        )
    named = [(k, p) for k, p in ref.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    x64 = x.to(torch.float64) if x.is_floating_point() else x
    out = torch.zeros(x.shape[0], dtype=torch.float64)
    for i in range(x.shape[0]):
        loss = loss_fn(ref(x64[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        out[i] = sum(
            (g.square().sum() for g in grads if g is not None), torch.zeros((), dtype=torch.float64)
        )
        if by_param is not None:
            for (k, _), g in zip(named, grads, strict=True):
                if g is not None:
                    by_param[k] = by_param.get(k, 0.0) + float(g.square().sum())
    return out


def contribution_sq_norms(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: LossFn = F.cross_entropy,
    bn: str = "contribution",
    by_param: dict[str, float] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per-sample terms of the batch gradient, by per-sample parameter copies (float64).

    Returns ``(sq_norms, batch_grad, term_sums)``: ||g_i||² per sample; the ordinary
    gradient of the batch's mean loss per parameter name; and Σ_i g_i / n per name
    (equals ``batch_grad`` under ``contribution``; differs for BN weights under
    ``paper``).
    """
    if bn not in ("contribution", "paper"):
        raise ValueError(f"bn={bn!r}")
    ref = _float64_copy(model)
    x64 = x.to(torch.float64) if x.is_floating_point() else x
    n = x.shape[0]
    deltas: dict[str, torch.Tensor] = {}
    with _per_sample_copies(ref, n, deltas, bn):
        loss = loss_fn(ref(x64), y)
        names = list(deltas)
        named = [(k, p) for k, p in ref.named_parameters() if p.requires_grad]
        grads = torch.autograd.grad(
            loss, [deltas[k] for k in names] + [p for _, p in named], allow_unused=True
        )
    # Mean-reduced loss: ∂loss/∂δ_i = g_i / n.
    sq = torch.zeros(n, dtype=torch.float64)
    term_sums: dict[str, torch.Tensor] = {}
    for name, g in zip(names, grads[: len(names)], strict=True):
        if g is None:
            continue
        terms = g * n
        sq += terms.reshape(n, -1).square().sum(dim=1)
        if by_param is not None:
            by_param[name] = by_param.get(name, 0.0) + float(terms.square().sum())
        term_sums[name] = terms.sum(dim=0) / n
    batch_grad = {
        k: g for (k, _), g in zip(named, grads[len(names) :], strict=True) if g is not None
    }
    missing = {k for k, _ in named} - set(deltas)
    if missing:
        raise ValueError(f"contribution_sq_norms does not know the layers of {sorted(missing)}")
    return sq, batch_grad, term_sums


@contextmanager
def _per_sample_copies(
    model: nn.Module, n: int, deltas: dict[str, torch.Tensor], bn: str
) -> Iterator[None]:
    """Temporarily give each supported layer a forward with per-sample δ copies."""
    patched: list[nn.Module] = []
    try:
        for prefix, module in model.named_modules():
            own = [(k, p) for k, p in module.named_parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            d = {k: torch.zeros((n, *p.shape), dtype=p.dtype, requires_grad=True) for k, p in own}
            for k, t in d.items():
                deltas[f"{prefix}.{k}" if prefix else k] = t
            module.forward = _make_forward(module, d, bn)  # type: ignore[method-assign]
            patched.append(module)
        yield
    finally:
        for module in patched:
            del module.forward  # back to the class's forward


def _bcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(n, C) -> (n, C, 1, ...) to broadcast against an (n, C, ...) activation."""
    return t.reshape(t.shape[0], t.shape[1], *([1] * (like.dim() - 2)))


def _make_forward(
    module: nn.Module, d: dict[str, torch.Tensor], bn: str
) -> Callable[[torch.Tensor], torch.Tensor]:
    zero_w = d.get("weight")
    zero_b = d.get("bias")

    if isinstance(module, nn.Linear):

        def linear(x: torch.Tensor) -> torch.Tensor:
            y = F.linear(x, module.weight, module.bias)
            if zero_w is not None:
                y = y + torch.einsum("n...i,noi->n...o", x, zero_w)
            if zero_b is not None:
                y = y + zero_b.reshape(x.shape[0], *([1] * (x.dim() - 2)), -1)
            return y

        return linear

    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        if module.padding_mode != "zeros":
            raise ValueError("reference supports zero padding only")
        conv = F.conv1d if isinstance(module, nn.Conv1d) else F.conv2d

        def convolution(x: torch.Tensor) -> torch.Tensor:
            y = module._conv_forward(x, module.weight, module.bias)
            extra = [
                conv(
                    x[i : i + 1],
                    zero_w[i] if zero_w is not None else torch.zeros_like(module.weight),
                    zero_b[i] if zero_b is not None else None,
                    module.stride,
                    module.padding,
                    module.dilation,
                    module.groups,
                )
                for i in range(x.shape[0])
            ]
            return y + torch.cat(extra)

        return convolution

    if isinstance(module, _BN):

        def batch_norm(x: torch.Tensor) -> torch.Tensor:
            use_batch = module.training or module.running_mean is None
            momentum = 0.0 if module.momentum is None else module.momentum
            if module.training and module.num_batches_tracked is not None:
                module.num_batches_tracked.add_(1)
                if module.momentum is None:
                    momentum = 1.0 / float(module.num_batches_tracked)
            # Normalise (and update running stats) exactly as the layer would, no affine.
            x_hat = F.batch_norm(
                x,
                module.running_mean,
                module.running_var,
                None,
                None,
                use_batch,
                momentum,
                module.eps,
            )
            y = x_hat * _bcast(module.weight.expand(x.shape[0], -1), x) + _bcast(
                module.bias.expand(x.shape[0], -1), x
            )
            if bn == "paper" and module.running_mean is not None:
                # Running statistics after this forward's update, as at backward time.
                shape = [1, -1] + [1] * (x.dim() - 2)
                x_w = (x - module.running_mean.view(shape)) / torch.sqrt(
                    module.running_var.view(shape) + module.eps
                )
            else:
                x_w = x_hat
            if zero_w is not None:
                y = y + x_w * _bcast(zero_w, x)
            if zero_b is not None:
                y = y + _bcast(zero_b, x)
            return y

        return batch_norm

    if isinstance(module, nn.GroupNorm):

        def group_norm(x: torch.Tensor) -> torch.Tensor:
            x_hat = F.group_norm(x, module.num_groups, None, None, module.eps)
            c = x.shape[1]
            y = x_hat * _bcast(module.weight.expand(x.shape[0], c), x) + _bcast(
                module.bias.expand(x.shape[0], c), x
            )
            if zero_w is not None:
                y = y + x_hat * _bcast(zero_w, x)
            if zero_b is not None:
                y = y + _bcast(zero_b, x)
            return y

        return group_norm

    raise ValueError(f"reference does not support layer {type(module).__name__} with parameters")


def drive_epoch(
    providers: StatsProvider | Sequence[StatsProvider],
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    *,
    measure: bool = True,
    max_micro_batch: int | None = None,
    loss_fn: LossFn = F.cross_entropy,
    order: torch.Tensor | None = None,
    stop_after: int | None = None,
    start_epoch: bool = True,
    end_epoch: bool = True,
) -> list[GradStats | None]:
    """One epoch driven exactly as :mod:`divebench.stats.base` documents (tests, benches).

    Several providers may watch the same trajectory (the first one's ``wrap`` produced
    ``module``); the micro-batch count honours all of them. ``order`` permutes the
    samples; ``stop_after`` ends after that many batches (with ``end_epoch=False``, to
    test resuming mid-epoch). Returns each provider's ``end_epoch()`` (empty list when
    ``end_epoch`` is False).
    """
    group = [providers] if not isinstance(providers, Sequence) else list(providers)
    if start_epoch:
        for p in group:
            p.start_epoch(measure, x.shape[0])
    idx_all = order if order is not None else torch.arange(x.shape[0])
    for t, start in enumerate(range(0, x.shape[0], batch_size)):
        if stop_after is not None and t >= stop_after:
            break
        idx = idx_all[start : start + batch_size]
        b = int(idx.shape[0])
        k = math.ceil(b / (max_micro_batch or b))
        if measure:
            k = max([k] + [p.min_micro_batches(b) for p in group])
        optimizer.zero_grad(set_to_none=True)
        for chunk in idx.tensor_split(k):
            m = int(chunk.shape[0])
            loss = loss_fn(module(x[chunk]), y[chunk])
            (loss * (m / b)).backward()
            if measure:
                for p in group:
                    p.after_micro_backward(m, m / b)
        if measure:
            for p in group:
                p.after_batch(b)
        optimizer.step()
    return [p.end_epoch() for p in group] if end_epoch else []


def drive_steps(
    provider: StatsProvider | None,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    every: int,
    loss_fn: LossFn = F.cross_entropy,
) -> list[StepStats]:
    """One epoch in step scope (:mod:`divebench.stats.base`): steps 0, every, 2·every, ...
    measured, the others not; ``provider=None`` is the plain epoch. Returns the measured
    steps' :class:`StepStats`."""
    out: list[StepStats] = []
    if provider is not None:
        provider.start_epoch(False, x.shape[0])
    for t, start in enumerate(range(0, x.shape[0], batch_size)):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        b = int(xb.shape[0])
        measure = provider is not None and t % every == 0
        k = provider.min_micro_batches(b) if measure and provider is not None else 1
        if provider is not None:
            provider.start_step(measure)
        optimizer.zero_grad(set_to_none=True)
        for chunk in torch.arange(b).tensor_split(k):
            m = int(chunk.shape[0])
            loss = loss_fn(module(xb[chunk]), yb[chunk])
            (loss if k == 1 else loss * (m / b)).backward()
            if measure and provider is not None:
                provider.after_micro_backward(m, m / b)
        if measure and provider is not None:
            provider.after_batch(b)
            stats = provider.end_step(t)
            assert stats is not None
            out.append(stats)
        optimizer.step()
    return out
