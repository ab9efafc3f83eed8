"""Same-run ratio gates on what gradient statistics cost (thresholds: bench/thresholds.py).

For each statistics provider (``exact``, ``epoch``, ``microbatch``), model and batch
size (128, 512): one *measured* epoch (the provider wrapping the model, driven as
:mod:`divebench.stats.base` documents, through ``divebench.stats.reference.drive_epoch``)
against one *plain* epoch of an identical, unwrapped copy of the model at the same batch
size, with SGD (momentum 0.9). The microbatch provider's epoch includes the split of every
batch into 4 micro-batches: that is what measuring costs it.

Timing is bench/gates.py's: CPU time of this process with torch on one thread, subject
and reference interleaved ABBA after a warm-up of each (which also runs the exact
provider's one-off choice of conv strategy per layer shape), the median of the paired
ratios, a failing gate re-measured with more pairs (up to 3×) and judged on all of
them. Only CPU time is gated here: both sides are plain compute in this process.

Models (built here, so the benchmark does not move when the suites' models do):

- ``mnist1d``: MNIST-1D's CNN (Greydanus 2020, as in divebench's mnist1d suite): three
  strided Conv1d of 25 channels and a linear head, on 4,000 random 1×40 inputs.
- ``cifar``: a small CIFAR-shaped CNN, three conv(3×3)-BatchNorm-ReLU-maxpool blocks of
  16/32/64 channels and a linear head, on 640 random 3×32×32 images (at batch 512 an
  epoch is a batch of 512 and a ragged one of 128: the epoch estimator needs two).

Peak memory (batch 512, measured after the timing pairs of the same sides): torch's CPU allocations are invisible to ``tracemalloc``, and
the process RSS mixes in allocator caching. Instead the epoch runs under
``torch.profiler`` with ``profile_memory=True``, whose allocation events (sizes signed:
allocations and frees, in time order) give the peak of torch's live bytes during the
epoch relative to its start; the bytes live at the start that the epoch works on
(parameters, buffers, optimiser state; not the dataset, which both sides share) are
added, so the peak covers what a device's ``max_memory_allocated`` would: model state,
activations, gradients and the provider's buffers (per-sample intermediates, the
float64 gradient sum). The ratio is measured-epoch peak over plain-epoch peak.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from gates import GateResult, one_thread, paired_ratio, timed  # bench/ is on sys.path under pytest
from thresholds import THRESHOLDS
from torch import nn
from torch.profiler import ProfilerActivity, profile

from divebench.models.small import MNIST1DCNN
from divebench.stats import make_provider
from divebench.stats.reference import drive_epoch, drive_steps

PROVIDERS = ("exact", "epoch", "microbatch")
BATCH_SIZES = (128, 512)
REPS = {"mnist1d": 16, "cifar": 6}  # pairs per gate, even (ABBA blocks); (up to 3× when a gate is re-measured)




def cifar_cnn(classes: int = 10) -> nn.Module:
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                nn.ReLU(), nn.MaxPool2d(2)]  # fmt: skip

    return nn.Sequential(
        *block(3, 16), *block(16, 32), *block(32, 64),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, classes),
    )  # fmt: skip


def workload(model_name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if model_name == "mnist1d":
        model: nn.Module = MNIST1DCNN(num_classes=10, length=40)  # the mnist1d suite's model
        x = torch.randn(4000, 1, 40, generator=gen)
    else:
        model = cifar_cnn()
        x = torch.randn(640, 3, 32, 32, generator=gen)
    return model, x, torch.randint(0, 10, (x.shape[0],), generator=gen)


class Plain:
    """No statistics at all: the reference epoch (same loop, no provider calls' work)."""

    name = "plain"

    def start_epoch(self, measure: bool, dataset_size: int) -> None: ...
    def min_micro_batches(self, batch_size: int) -> int:
        return 1

    def after_micro_backward(self, micro_size: int, loss_scale: float) -> None: ...
    def after_batch(self, batch_size: int) -> None: ...
    def end_epoch(self) -> None:
        return None


class Sides:
    """A measured side (provider-wrapped model) and a plain side (identical copy)."""

    def __init__(self, model_name: str, provider_name: str, batch_size: int) -> None:
        model, self.x, self.y = workload(model_name)
        plain_model = copy.deepcopy(model)
        self.batch_size = batch_size
        self.provider = make_provider(provider_name)
        self.module = self.provider.wrap(model)
        self.opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        self.plain_model = plain_model
        self.plain_opt = torch.optim.SGD(plain_model.parameters(), lr=0.01, momentum=0.9)
        self.last_stats: Any = None

    def measured_epoch(self) -> None:
        (self.last_stats,) = drive_epoch(
            self.provider, self.module, self.opt, self.x, self.y, self.batch_size
        )

    def plain_epoch(self) -> None:
        drive_epoch(Plain(), self.plain_model, self.plain_opt, self.x, self.y, self.batch_size)


def peak_bytes(fn: Callable[[], None], module: nn.Module, opt: torch.optim.Optimizer) -> int:
    """Peak torch CPU bytes of ``fn`` (see the module docstring): state + in-epoch peak."""
    state = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
    state += sum(
        v.numel() * v.element_size()
        for s in opt.state.values()
        for v in s.values()
        if isinstance(v, torch.Tensor)
    )
    state += sum(
        p.grad.numel() * p.grad.element_size() for p in module.parameters() if p.grad is not None
    )
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return state + peak


# --------------------------------------------------------------------------- the gates


def _variants() -> list[Any]:
    """Every model x provider x batch size; CI (``-m "not full"``) runs the exact provider
    at B=128 on both models, the rest is ``full``."""
    out = []
    for model_name in ("mnist1d", "cifar"):
        for provider in PROVIDERS:
            for batch_size in BATCH_SIZES:
                marks = () if (provider, batch_size) == ("exact", 128) else (pytest.mark.full,)
                out.append(pytest.param(model_name, provider, batch_size, marks=marks,
                                        id=f"{model_name}-{provider}-{batch_size}"))
    return out


@pytest.mark.parametrize(("model_name", "provider", "batch_size"), _variants())
def test_measured_epoch_vs_plain(
    benchmark: Any, model_name: str, provider: str, batch_size: int
) -> None:
    """A measured epoch against a plain one: time (exact ≤ 2×, epoch ≤ 1.1×, microbatch a
    regression gate) and, at batch 512, peak memory (≤ 2×); bench/thresholds.py."""
    name = f"stats_{provider}_{model_name}_b{batch_size}"
    sides = Sides(model_name, provider, batch_size)

    def gate() -> GateResult:
        return paired_ratio(name, timed(sides.measured_epoch), timed(sides.plain_epoch), REPS[model_name])

    result = benchmark.pedantic(gate, rounds=1, iterations=1)
    benchmark.extra_info.update(result.info())
    stats = sides.last_stats
    assert stats is not None and stats.n_samples == sides.x.shape[0]
    assert stats.sum_sq_norms > 0 and stats.grad_sum_sq_norm > 0, stats
    messages = [result.message()]
    passed = result.passed
    if batch_size == 512:
        mem_name = f"{name}_peak_memory"
        with one_thread():
            measured = peak_bytes(sides.measured_epoch, sides.module, sides.opt)
            plain = peak_bytes(sides.plain_epoch, sides.plain_model, sides.plain_opt)
        limit = THRESHOLDS[mem_name][0]
        ratio = measured / plain
        benchmark.extra_info.update({"memory_gate": mem_name, "memory_ratio": ratio,
                                     "measured_peak_mb": measured / 2**20,
                                     "plain_peak_mb": plain / 2**20})  # fmt: skip
        messages.append(f"gate {mem_name}: {'ok' if ratio <= limit else 'FAILED'}: ratio "
                        f"{ratio:.3f} (threshold {limit:.2f}); measured "
                        f"{measured / 2**20:.1f} MB, plain {plain / 2**20:.1f} MB")  # fmt: skip
        passed = passed and ratio <= limit
    print("\n".join(messages))
    assert passed, "\n".join(messages)


# ------------------------------------------------------------- per-step statistics

STEP_BATCH = 32  # the mnist1d suite's B0, where the per-step rules start


@pytest.mark.parametrize("every", [pytest.param(1, marks=pytest.mark.full), 10])
def test_per_step_measurement_vs_plain(benchmark: Any, every: int) -> None:
    """An epoch of the MNIST-1D CNN at B=32 in step scope, every ``every``-th step measured
    by ``exact`` (what gns / normtest with ``interval=every`` pay), against a plain epoch
    of an identical model at the same batch size. Regression gates (bench/thresholds.py);
    the issue's targets, 1.35× for every step and 1.05× for every 10th, are not met (README)."""
    name = f"stats_exact_per_step_every{every}_mnist1d_b{STEP_BATCH}"
    model, x, y = workload("mnist1d")
    plain_model = copy.deepcopy(model)
    provider = make_provider("exact")
    module = provider.wrap(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    plain_opt = torch.optim.SGD(plain_model.parameters(), lr=0.01, momentum=0.9)
    measured: list[Any] = []

    def subject() -> None:
        measured[:] = drive_steps(provider, module, opt, x, y, STEP_BATCH, every)

    def reference() -> None:
        drive_steps(None, plain_model, plain_opt, x, y, STEP_BATCH, every)

    def gate() -> GateResult:
        return paired_ratio(name, timed(subject), timed(reference), 8)

    result = benchmark.pedantic(gate, rounds=1, iterations=1)
    benchmark.extra_info.update(result.info())
    steps = -(-x.shape[0] // STEP_BATCH)
    assert len(measured) == -(-steps // every) and all(s.sum_sq_norms > 0 for s in measured)
    print(result.message())
    assert result.passed, result.message()


# ------------------------------------------------------- beside the libraries (printed)


def _library_epoch(kind: str, model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
                   y: torch.Tensor, batch_size: int) -> Callable[[], float]:
    """One epoch that also gets every sample's squared gradient norm from a library;
    returns Σ_i ||g_i||² (the step is the ordinary one)."""
    import torch.nn.functional as F
    from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping
    from torch.func import functional_call, grad, vmap

    if kind == "opacus_grad_sample":
        module: nn.Module = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=False)
    elif kind == "opacus_ghost_norm":
        module = GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="mean", strict=False,
                                                      max_grad_norm=1e30, use_ghost_clipping=True)
    else:
        # batch-of-one BatchNorm under vmap cannot update running statistics in place
        module = torch.func.replace_all_batch_norm_modules_(model)
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())

    def one_loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, (p, buffers), (xi.unsqueeze(0),)), yi.unsqueeze(0))

    per_sample_grads = vmap(grad(one_loss), in_dims=(None, 0, 0))

    def epoch() -> float:
        total = 0.0
        for start in range(0, x.shape[0], batch_size):
            xb, yb = x[start : start + batch_size], y[start : start + batch_size]
            m = xb.shape[0]
            opt.zero_grad(set_to_none=True)
            if kind == "torch_func":
                g = per_sample_grads({k: v.detach() for k, v in params.items()}, xb, yb)
                sq = sum(t.reshape(m, -1).square().sum(1) for t in g.values())
                for k, p in params.items():
                    p.grad = g[k].mean(0)
            else:
                F.cross_entropy(module(xb), yb).backward()
                if kind == "opacus_grad_sample":
                    sq = sum(p.grad_sample.reshape(m, -1).square().sum(1) for p in params.values())  # type: ignore[union-attr]
                    for p in params.values():
                        p.grad_sample = None  # type: ignore[attr-defined]
                else:
                    sq = module.get_norm_sample().square()  # type: ignore[operator]
            total += float(sq.sum())  # type: ignore[union-attr]
            opt.step()
        return total

    return epoch


LIBRARIES = ("opacus_grad_sample", "opacus_ghost_norm", "torch_func")
NOT_GATED = 1e9  # printed for comparison, never failed on


@pytest.mark.full
@pytest.mark.parametrize("model_name", ["mnist1d", "cifar"])
def test_exact_beside_the_libraries(model_name: str) -> None:
    """Not a gate: the cost of a measured epoch (exact provider) printed beside the cost of
    the same per-sample squared norms from Opacus' GradSampleModule (per-sample gradients
    materialised), Opacus' ghost-norm module (its own hooks) and torch.func (vmap of
    grad), each against its own plain epoch, same model, data and batch (B=128), CPU
    time, one thread. For BatchNorm models torch.func's per-sample forward normalises
    each sample by its own statistics (another quantity, same cost)."""
    batch_size = 128
    lines = [f"{model_name}, B={batch_size}: measured epoch / plain epoch, CPU time, 1 thread"]
    sides = Sides(model_name, "exact", batch_size)
    exact = paired_ratio(f"exact_{model_name}", timed(sides.measured_epoch), timed(sides.plain_epoch), 4,
                         threshold=NOT_GATED, max_rounds=1)
    lines.append(f"  divebench exact        {exact.ratio:6.2f}x")
    ratios = {}
    for kind in LIBRARIES:
        model, x, y = workload(model_name)
        plain_model = copy.deepcopy(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        plain_opt = torch.optim.SGD(plain_model.parameters(), lr=0.01, momentum=0.9)
        epoch = _library_epoch(kind, model, opt, x, y, batch_size)

        def plain(pm: nn.Module = plain_model, po: torch.optim.Optimizer = plain_opt,
                  xs: torch.Tensor = x, ys: torch.Tensor = y) -> None:
            drive_epoch(Plain(), pm, po, xs, ys, batch_size)

        try:
            assert epoch() > 0
            res = paired_ratio(f"{kind}_{model_name}", timed(epoch), timed(plain), 4, threshold=NOT_GATED,
                               max_rounds=1)
            ratios[kind] = res.ratio
            lines.append(f"  {kind:<22} {res.ratio:6.2f}x")
        except Exception as exc:  # a library that cannot run this model: say so, go on
            lines.append(f"  {kind:<22} cannot run: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}")
    print("\n".join(lines))
    assert exact.ratio > 0 and ratios, "\n".join(lines)
