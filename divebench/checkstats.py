"""``divebench check-stats``: the exact provider next to a float64 per-sample reference.

For K batches of a suite's training data (the evaluation transform: no random
augmentation), at the model's initial weights (no optimiser step), it computes
Σ_i ||g_i||² per parameter twice:

- with :class:`~divebench.stats.exact.ExactProvider`, driven as the training loop drives
  it (wrap, start_epoch, forward, backward, after_micro_backward, after_batch), in the
  run's dtype on the run's device;
- with a float64 reference that shares no code with it
  (:mod:`divebench.stats.reference`): one sample at a time through ``torch.autograd.grad``
  for models without BatchNorm; per-sample parameter copies in one train-mode batch for
  models with it (the ``contribution`` or ``paper`` definition, ``bn=``), from the same
  weights and BatchNorm running statistics.

It prints one row per parameter (relative error of the provider against the reference)
and the total, and returns 0 when every parameter agrees within ``tolerance``, 1 when
one does not or when the provider refuses the model (the refusal names the parameter
or layer), and raises :class:`~divebench.config.ConfigError` (exit 2) for bad input.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from divebench.config import ConfigError, RunConfig

DEFAULT_BATCHES = 2
# Relative, per parameter. check-stats runs the provider in float64 unless dtype= says
# otherwise: the algorithm is then checked to rounding (measured: <= 1e-15 on the CIFAR
# ResNet-18, 3e-9 on the MNIST-1D CNN), so an error of 1e-5 (a lost cross term of a
# shared weight) stands out. In float32 a deep BatchNorm net rounds by up to 5.4e-4
# (CIFAR ResNet-18 at batch 8, first layers): 1e-3 there.
DEFAULT_TOLERANCE = {"float64": 1e-6, "float32": 1e-3}
OPTIONS = ("batches", "tolerance", "bn")  # check-stats' own keys, besides the run keys


@dataclass
class Row:
    name: str
    exact: float | None
    reference: float | None

    @property
    def rel_error(self) -> float:
        if self.exact is None or self.reference is None:
            return math.inf
        if self.reference == 0:
            return 0.0 if self.exact == 0 else math.inf
        return abs(self.exact - self.reference) / abs(self.reference)


@dataclass
class Outcome:
    suite: str
    model: str
    rows: list[Row]
    exact_total: float
    reference_total: float
    refused: str | None
    tolerance: float
    batches: int
    batch_size: int
    dtype: str

    @property
    def passed(self) -> bool:
        return self.refused is None and all(r.rel_error <= self.tolerance for r in self.rows)


def parse_options(overrides: dict[str, str]) -> tuple[int, float | None, str]:
    """Pop check-stats' own keys from ``overrides``; (batches, tolerance or None for the
    dtype's default, bn). Without ``dtype=``, check-stats runs in float64."""
    raw = overrides.pop("batches", str(DEFAULT_BATCHES))
    try:
        batches = int(raw)
    except ValueError:
        batches = 0
    if batches < 1:
        raise ConfigError(f"batches={raw!r} is not valid: expected an integer >= 1")
    tolerance = None
    if "tolerance" in overrides:
        raw = overrides.pop("tolerance")
        try:
            tolerance = float(raw)
        except ValueError:
            tolerance = -1.0
        if not tolerance > 0 or not math.isfinite(tolerance):
            raise ConfigError(f"tolerance={raw!r} is not valid: expected a positive number (relative error, e.g. 1e-6)")
    for key in list(overrides):  # a misspelled option of check-stats itself
        close = difflib.get_close_matches(key, OPTIONS, n=1, cutoff=0.8)
        if close and key not in OPTIONS and "." not in key:
            from divebench.config import KEYS

            if key not in KEYS:
                raise ConfigError(f"unknown key '{key}'; did you mean '{close[0]}'? (check-stats keys: "
                                  f"{', '.join(OPTIONS)}, and the run keys)")
    # float64 by default; with bf16 autocast asked for, the run's float32
    overrides.setdefault("dtype", "float32" if overrides.get("amp", "off") != "off" else "float64")
    bn = overrides.pop("bn", "contribution")
    if bn not in ("contribution", "paper"):
        raise ConfigError(f"bn={bn!r} is not valid: expected contribution or paper")
    return batches, tolerance, bn


def check(cfg: RunConfig, registry: Any, device: torch.device, batches: int, tolerance: float | None,
          bn: str, log: Callable[[str], None] = lambda s: None) -> Outcome:
    from divebench import engine
    from divebench.stats.exact import ExactProvider, StatisticsRefused, unwrap
    from divebench.stats.reference import contribution_sq_norms, loop_sq_norms

    v = cfg.values
    if tolerance is None:
        tolerance = DEFAULT_TOLERANCE[v["dtype"]]
    data = engine.build_data(cfg, registry, device)
    batch_size = int(v["batch_size"])
    if data.train_size < batch_size:
        raise ConfigError(f"batch_size={batch_size} is larger than the training set ({data.train_size} samples)")
    if batches > data.train_size // batch_size:
        log(f"  batches={batches}: the training set holds {data.train_size // batch_size} batches of "
            f"{batch_size}; checking those")
        batches = data.train_size // batch_size
    dtype = getattr(torch, v["dtype"])
    seed = int(v["seeds"][0]) if v["seeds"] else 0
    torch.manual_seed(seed)
    model = engine.build_model(cfg, registry, data, device)
    model.train()
    names = {p: k for k, p in model.named_parameters() if p.requires_grad}  # first name of a shared one
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    provider = ExactProvider(bn=bn)
    module = provider.wrap(model)
    recorder = provider.record_per_parameter()
    order = torch.randperm(data.train_size, generator=torch.Generator().manual_seed(seed))
    exact: dict[str, float] = {}
    reference: dict[str, float] = {}
    refused = None
    provider.start_epoch(True, data.train_size)
    for k in range(batches):
        idx = order[k * batch_size : (k + 1) * batch_size].to(data.y_train.device)
        x = data.eval_transform(data.x_train[idx])
        if x.is_floating_point():
            x = x.to(dtype)
        y = data.y_train[idx]
        # the reference starts from the same weights and BatchNorm running statistics
        snapshot = {key: t.detach().clone() for key, t in unwrap(module).state_dict().items()}
        try:
            module.zero_grad(set_to_none=True)
            F.cross_entropy(module(x), y).backward()
            provider.after_micro_backward(batch_size, 1.0)
            provider.after_batch(batch_size)
        except StatisticsRefused as exc:
            refused = str(exc).splitlines()[0]
            break
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:  # the model itself failed
            raise ConfigError(f"model={v['model']} failed on suite {cfg.suite.name}'s data "
                              f"(input {tuple(x.shape)}, {x.dtype}): {str(exc).splitlines()[0]}") from None
        for p, sq in recorder.items():  # the hooks' norms are ||g_i|| / m (mean loss)
            exact[names[p]] = exact.get(names[p], 0.0) + float(sq) * batch_size**2
        recorder.clear()
        ref_model = engine.build_model(cfg, registry, data, device)
        ref_model.load_state_dict(snapshot)
        ref_model.train()
        xr, yr = x.detach().cpu(), y.cpu()
        try:
            if has_bn:
                contribution_sq_norms(ref_model.cpu(), xr, yr, bn=bn, by_param=reference)
            else:
                loop_sq_norms(ref_model.cpu(), xr, yr, by_param=reference)
        except ValueError as exc:
            raise ConfigError(f"check-stats has no float64 reference for model={v['model']}: "
                              f"{str(exc).splitlines()[0]}") from None
        log(f"  batch {k + 1}/{batches} checked")
    stats = provider.end_epoch() if refused is None else None
    rows = [Row(n, exact.get(n), reference.get(n)) for n in dict.fromkeys([*names.values()])
            if n in exact or n in reference]
    return Outcome(
        suite=cfg.suite.name, model=str(v["model"]), rows=rows,
        exact_total=stats.sum_sq_norms if stats is not None else math.nan,
        reference_total=sum(reference.values()), refused=refused, tolerance=tolerance,
        batches=batches, batch_size=batch_size, dtype=str(v["dtype"]),
    )


def format_outcome(out: Outcome) -> str:
    head = (f"check-stats {out.suite}: model {out.model}, {out.batches} batch(es) of {out.batch_size}, "
            f"exact provider ({out.dtype}) vs float64 per-sample reference, tolerance {out.tolerance:g} relative")
    if out.refused is not None:
        return f"{head}\nREFUSED: {out.refused}"
    width = max([len(r.name) for r in out.rows] + [9])
    lines = [head, f"{'parameter':<{width}}  {'exact Σ‖g_i‖²':>14}  {'reference':>14}  {'rel. error':>10}"]
    for r in out.rows:
        fmt = (lambda t: f"{t:14.6e}" if t is not None else f"{'missing':>14}")  # noqa: E731
        verdict = "ok" if r.rel_error <= out.tolerance else "DISAGREES"
        lines.append(f"{r.name:<{width}}  {fmt(r.exact)}  {fmt(r.reference)}  {r.rel_error:10.2e}  {verdict}")
    total_rel = (abs(out.exact_total - out.reference_total) / out.reference_total
                 if out.reference_total else math.inf)
    lines.append(f"{'total':<{width}}  {out.exact_total:14.6e}  {out.reference_total:14.6e}  {total_rel:10.2e}")
    bad = [r.name for r in out.rows if r.rel_error > out.tolerance]
    lines.append("all parameters agree" if not bad else f"DISAGREE: {', '.join(bad)}")
    return "\n".join(lines)
