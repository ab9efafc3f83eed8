"""The exact provider (Opacus per-sample norms) against float64 references.

References (divebench.stats.reference) never touch Opacus: a one-sample-at-a-time loop
for models without BatchNorm, per-sample parameter copies in one train-mode graph for
models with it. Unless a test says otherwise, weights are held fixed (lr = 0) so the
epoch's Σ_i ||g_i||² is a plain sum over the samples, comparable with the references.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from opacus.grad_sample import GradSampleModule
from opacus.grad_sample.conv import compute_conv_grad_sample
from torch import nn

from divebench.stats import ESTIMATORS, ExactProvider, make_provider, unwrap
from divebench.stats import exact as exact_mod
from divebench.stats.bn import compute_batch_norm_grad_sample
from divebench.stats.reference import contribution_sq_norms, drive_epoch, loop_sq_norms

RTOL = 1e-5  # float32 provider against float64 references


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 5))


def cnn_groupnorm() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False), nn.GroupNorm(4, 8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    )  # fmt: skip


def cnn_batchnorm() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 5),
    )  # fmt: skip


def data(shape: tuple[int, ...], n: int, classes: int = 5, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=gen), torch.randint(0, classes, (n,), generator=gen)


def measure_once(model: nn.Module, x, y, batch_size: int, bn: str = "contribution", **kw):
    """One measured epoch at fixed weights; returns the stats and the wrapped module."""
    provider = ExactProvider(bn=bn)
    module = provider.wrap(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    (stats,) = drive_epoch(provider, module, opt, x, y, batch_size, **kw)
    return stats, module, provider


@pytest.mark.parametrize("build, shape", [(mlp, (20,)), (cnn_groupnorm, (3, 8, 8))])
def test_exact_matches_per_sample_loop(build, shape):
    torch.manual_seed(0)
    model = build()
    x, y = data(shape, 12)
    want = loop_sq_norms(model, x, y)
    # The per-sample-copies reference agrees with the loop where both are defined.
    copies, _, _ = contribution_sq_norms(model, x, y)
    torch.testing.assert_close(copies, want, rtol=1e-10, atol=0)
    stats, _, _ = measure_once(model, x, y, batch_size=6)
    assert stats.sum_sq_norms == pytest.approx(want.sum().item(), rel=RTOL)
    # ||S||² = ||Σ_i g_i||² = ||n · (full-batch mean gradient)||².
    full = copy.deepcopy(model).double()
    F.cross_entropy(full(x.double()), y).backward()
    s2 = sum((p.grad * x.shape[0]).square().sum() for p in full.parameters()).item()
    assert stats.grad_sum_sq_norm == pytest.approx(s2, rel=RTOL)
    assert stats.n_samples == 12
    assert stats.diversity == pytest.approx(want.sum().item() / s2, rel=2 * RTOL)
    assert stats.n_diversity == pytest.approx(12 * stats.diversity, rel=1e-12)
    assert stats.estimator == "exact" and stats.time_s > 0


@pytest.mark.parametrize("bn", ["contribution", "paper"])
def test_exact_matches_copies_reference_with_batchnorm(bn):
    torch.manual_seed(1)
    model = cnn_batchnorm()
    x, y = data((3, 8, 8), 10)
    want, _, _ = contribution_sq_norms(model, x, y, bn=bn)
    stats, _, _ = measure_once(model, x, y, batch_size=10, bn=bn)
    assert stats.sum_sq_norms == pytest.approx(want.sum().item(), rel=RTOL)


@pytest.mark.parametrize("bn", ["contribution", "paper"])
def test_exact_matches_reference_on_resnet18(bn):
    """Whole torchvision ResNet-18 (BN, in-place ReLU and residual adds), 4 CIFAR images.

    Run in float64: with 4 samples the last stage's BatchNorm normalises 4 values per
    channel, and float32 ``p.grad`` itself differs from float64 by 3e-4 relative here,
    so a float32 run can only be compared loosely (second check).
    """
    torch.manual_seed(2)
    model = torchvision.models.resnet18(num_classes=10)
    x, y = data((3, 32, 32), 4, classes=10)
    want, _, _ = contribution_sq_norms(model, x, y, bn=bn)
    stats64, _, _ = measure_once(copy.deepcopy(model).double(), x.double(), y, 4, bn=bn)
    assert stats64.sum_sq_norms == pytest.approx(want.sum().item(), rel=1e-9)
    if bn == "contribution":
        stats32, _, _ = measure_once(model, x, y, 4, bn=bn)
        assert stats32.sum_sq_norms == pytest.approx(want.sum().item(), rel=3e-3)


def test_paper_mode_differs_only_in_batchnorm_weights():
    torch.manual_seed(3)
    model = cnn_batchnorm()
    x, y = data((3, 8, 8), 10)
    _, batch_grad, sums_c = contribution_sq_norms(model, x, y, bn="contribution")
    _, _, sums_p = contribution_sq_norms(model, x, y, bn="paper")
    bn_weights = {
        f"{i}.weight" for i, m in enumerate(model) if isinstance(m, nn.modules.batchnorm._BatchNorm)
    }
    for name, g in batch_grad.items():
        # contribution: the per-sample terms add up to the batch gradient, always.
        torch.testing.assert_close(sums_c[name], g, rtol=1e-10, atol=1e-12)
        if name in bn_weights:
            assert not torch.allclose(sums_p[name], g, rtol=1e-3)
        else:
            torch.testing.assert_close(sums_p[name], g, rtol=1e-10, atol=1e-12)
    c, _, _ = measure_once(copy.deepcopy(model), x, y, 10, bn="contribution")
    p, _, _ = measure_once(copy.deepcopy(model), x, y, 10, bn="paper")
    assert c.grad_sum_sq_norm == p.grad_sum_sq_norm  # same p.grad either way
    assert c.sum_sq_norms != pytest.approx(p.sum_sq_norms, rel=1e-4)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # Opacus' own hooks
def test_batchnorm_grad_sampler_terms_sum_to_batch_gradient():
    """Stock Opacus GradSampleModule (hooks mode) with divebench's registered BN sampler."""
    torch.manual_seed(4)
    model = cnn_batchnorm()
    x, y = data((3, 8, 8), 10)
    gsm = GradSampleModule(model, loss_reduction="mean", strict=False)
    F.cross_entropy(gsm(x), y).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(
            p.grad_sample.mean(dim=0), p.grad, rtol=1e-4, atol=1e-6, msg=name
        )
    gsm._close()


def test_batchnorm_sampler_uses_the_batch_statistics():
    bn = nn.BatchNorm2d(3).double()
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64) * 3 + 1
    bn(x)  # a train-mode forward moves the running statistics away from (0, 1)
    backprops = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    out = compute_batch_norm_grad_sample(bn, [x], backprops)
    x_hat = (x - x.mean(dim=(0, 2, 3), keepdim=True)) / torch.sqrt(
        x.var(dim=(0, 2, 3), unbiased=False, keepdim=True) + bn.eps
    )
    torch.testing.assert_close(out[bn.weight], (backprops * x_hat).sum(dim=(2, 3)))
    torch.testing.assert_close(out[bn.bias], backprops.sum(dim=(2, 3)))


def test_loss_scale_one_or_three_micro_batches():
    """Same Δ̂ whether a batch of 12 runs whole or as micro-batches of 4 (loss × m/B)."""
    torch.manual_seed(5)
    model = mlp()
    x, y = data((20,), 36)
    results = []
    for max_micro in (None, 4):
        m = copy.deepcopy(model)
        provider = ExactProvider()
        module = provider.wrap(m)
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        (stats,) = drive_epoch(provider, module, opt, x, y, 12, max_micro_batch=max_micro)
        results.append(stats)
    whole, micro = results
    assert micro.sum_sq_norms == pytest.approx(whole.sum_sq_norms, rel=RTOL)
    assert micro.grad_sum_sq_norm == pytest.approx(whole.grad_sum_sq_norm, rel=RTOL)
    assert micro.diversity == pytest.approx(whole.diversity, rel=RTOL)


def test_ragged_last_batch_enters_with_its_true_size():
    torch.manual_seed(6)
    model = mlp()
    x, y = data((20,), 10)  # batches of 4, 4, 2
    want = loop_sq_norms(model, x, y).sum().item()
    stats, _, _ = measure_once(model, x, y, batch_size=4)
    full = copy.deepcopy(model).double()
    F.cross_entropy(full(x.double()), y).backward()
    s2 = sum((p.grad * 10).square().sum() for p in full.parameters()).item()
    assert stats.n_samples == 10
    assert stats.sum_sq_norms == pytest.approx(want, rel=RTOL)
    assert stats.grad_sum_sq_norm == pytest.approx(s2, rel=RTOL)


@pytest.mark.parametrize("build, shape", [(cnn_batchnorm, (3, 8, 8)), (mlp, (20,))])
@pytest.mark.parametrize("measure", [True, False])
def test_training_is_bitwise_identical_with_the_provider(build, shape, measure):
    torch.manual_seed(7)
    plain = build()
    watched = copy.deepcopy(plain)
    x, y = data(shape, 24)
    opt_a = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    opt_b = torch.optim.SGD(watched.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    provider = ExactProvider()
    module = provider.wrap(watched)

    class Silent:  # the same loop with no provider at all
        def start_epoch(self, measure, n): ...
        def min_micro_batches(self, b):
            return 1  # noqa: E704

        def after_micro_backward(self, m, s): ...
        def after_batch(self, b): ...
        def end_epoch(self):
            return None  # noqa: E704

    for _ in range(2):
        drive_epoch(Silent(), plain, opt_a, x, y, 8, measure=measure)
        drive_epoch(provider, module, opt_b, x, y, 8, measure=measure)
    for (name, a), b in zip(plain.state_dict().items(), watched.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # parameters and BatchNorm running statistics


def test_resnet18_training_is_bitwise_identical():
    torch.manual_seed(8)
    plain = torchvision.models.resnet18(num_classes=10)
    watched = copy.deepcopy(plain)
    x, y = data((3, 32, 32), 4, classes=10)
    provider = ExactProvider()
    module = provider.wrap(watched)
    provider.start_epoch(True, 4)
    for mod in (plain, module):
        F.cross_entropy(mod(x), y).backward()
        if mod is module:
            provider.after_micro_backward(4, 1.0)
            provider.after_batch(4)
    for (name, a), b in zip(plain.named_parameters(), watched.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad), name
    for (name, a), b in zip(plain.named_buffers(), watched.buffers(), strict=True):
        assert torch.equal(a, b), name
    assert provider.end_epoch().sum_sq_norms > 0


def test_unmeasured_epoch_runs_no_per_sample_code(monkeypatch):
    torch.manual_seed(9)
    model = cnn_groupnorm()
    x, y = data((3, 8, 8), 16)
    calls = []
    real = exact_mod.conv_norm_sample
    monkeypatch.setattr(exact_mod, "conv_norm_sample", lambda *a: calls.append(1) or real(*a))
    provider = ExactProvider()
    module = provider.wrap(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert drive_epoch(provider, module, opt, x, y, 8, measure=False) == [None]
    assert calls == []
    assert all(not m._forward_hooks for m in model.modules())  # hooks physically removed
    assert module.pending_norms == [] and module.hook_time_s == 0.0
    assert all(getattr(p, "grad_sample", None) is None for p in model.parameters())
    assert not any(hasattr(m, "activations") for m in model.modules())
    # A measured epoch afterwards works and re-attaches them; the next unmeasured drops them.
    (stats,) = drive_epoch(provider, module, opt, x, y, 8, measure=True)
    assert stats is not None and calls
    assert drive_epoch(provider, module, opt, x, y, 8, measure=False) == [None]
    assert all(not m._forward_hooks for m in model.modules())


def test_state_dict_keys_and_unwrap():
    model = cnn_batchnorm()
    provider = ExactProvider()
    module = provider.wrap(model)
    assert unwrap(module) is model and unwrap(model) is model
    assert set(module.state_dict()) == {f"_module.{k}" for k in model.state_dict()}
    module.load_state_dict(module.state_dict())
    assert not any("divebench" in k for k in module.state_dict())  # mode marks are not state


def test_resume_mid_epoch_gives_the_same_statistics():
    torch.manual_seed(10)
    model = mlp()
    x, y = data((20,), 40)
    want, _, _ = measure_once(copy.deepcopy(model), x, y, 8)
    first = ExactProvider()
    module = first.wrap(copy.deepcopy(model))
    opt = torch.optim.SGD(module.parameters(), lr=0.0)
    drive_epoch(first, module, opt, x, y, 8, stop_after=2, end_epoch=False)
    state = first.state_dict()
    second = ExactProvider()  # as after a restart: new provider, same weights (lr = 0)
    module2 = second.wrap(copy.deepcopy(model))
    second.load_state_dict(state)
    opt2 = torch.optim.SGD(module2.parameters(), lr=0.0)
    (got,) = drive_epoch(second, module2, opt2, x[16:], y[16:], 8, start_epoch=False)
    assert got.n_samples == 40
    assert got.sum_sq_norms == pytest.approx(want.sum_sq_norms, rel=1e-12)
    assert got.grad_sum_sq_norm == pytest.approx(want.grad_sum_sq_norm, rel=1e-12)


def test_abort_batch_forgets_the_partial_batch():
    torch.manual_seed(11)
    model = mlp()
    x, y = data((20,), 16)
    want, _, _ = measure_once(copy.deepcopy(model), x, y, 8)
    provider = ExactProvider()
    module = provider.wrap(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    provider.start_epoch(True, 16)
    F.cross_entropy(module(x[:4]), y[:4]).mul(0.5).backward()  # first half, then "OOM"
    provider.after_micro_backward(4, 0.5)
    opt.zero_grad(set_to_none=True)
    provider.abort_batch()
    (got,) = drive_epoch(provider, module, opt, x, y, 8, start_epoch=False)
    assert got.sum_sq_norms == pytest.approx(want.sum_sq_norms, rel=1e-12)


def _conv_cases():
    yield nn.Conv1d(3, 6, 5, stride=2, padding=1)
    yield nn.Conv1d(4, 6, 3, padding="same", dilation=2, groups=2, bias=False)
    yield nn.Conv2d(3, 5, 3, stride=2, padding=1)
    yield nn.Conv2d(4, 6, (3, 2), stride=(1, 2), padding=(2, 1), dilation=(2, 1), groups=2)
    yield nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect")


@pytest.mark.parametrize("layer", list(_conv_cases()), ids=lambda m: repr(m))
@pytest.mark.parametrize("strategy", sorted(exact_mod._CONV_STRATEGIES))
def test_conv_norm_strategies_match_opacus_conv_sampler(layer, strategy):
    """Every conv strategy against Opacus' own (unfold-based) per-sample gradients."""
    torch.manual_seed(12)
    layer = layer.double()
    x = torch.randn(7, layer.in_channels, *([9] * (layer.weight.dim() - 2)), dtype=torch.float64)
    if layer.padding_mode != "zeros":
        # Opacus' sampler assumes zero padding: compare on the explicitly padded input.
        ref_layer = copy.deepcopy(layer)
        ref_layer.padding_mode, ref_layer.padding = "zeros", (0,) * (x.dim() - 2)
        x_ref = exact_mod._padded(layer, x)
    else:
        ref_layer, x_ref = layer, x
    b = torch.randn_like(layer(x))
    want = compute_conv_grad_sample(ref_layer, [x_ref], b)[ref_layer.weight].flatten(1).norm(dim=1)
    got = exact_mod._CONV_STRATEGIES[strategy](layer, x, b)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    out = exact_mod.conv_norm_sample(layer, [x], b)
    torch.testing.assert_close(out[layer.weight], want, rtol=1e-10, atol=1e-12)
    if layer.bias is not None:
        bias = compute_conv_grad_sample(ref_layer, [x_ref], b)[ref_layer.bias].norm(dim=1)
        torch.testing.assert_close(out[layer.bias], bias, rtol=1e-10, atol=1e-12)


def test_conv_norm_sample_chunks_large_batches(monkeypatch):
    # Patches of 3 samples (3 × 108 × 9 = 2916 elements) fit a budget of 3000 > the
    # input's 972 elements: 9 samples go through in 3 chunks.
    monkeypatch.setattr(exact_mod, "_CHUNK_ELEMENTS", 3000)
    seen = []
    for name, fn in list(exact_mod._CONV_STRATEGIES.items()):
        monkeypatch.setitem(
            exact_mod._CONV_STRATEGIES,
            name,
            lambda m, x, b, fn=fn: seen.append(len(x)) or fn(m, x, b),
        )
    layer = nn.Conv2d(3, 4, 3, padding=1).double()
    x = torch.randn(9, 3, 6, 6, dtype=torch.float64)
    b = torch.randn(9, 4, 6, 6, dtype=torch.float64)
    want = compute_conv_grad_sample(layer, [x], b)[layer.weight].flatten(1).norm(dim=1)
    seen.clear()
    got = exact_mod.conv_norm_sample(layer, [x], b)[layer.weight]
    torch.testing.assert_close(got, want)
    assert seen[-3:] == [3, 3, 3]


def test_refuses_eval_mode_layers():
    x, y = data((20,), 8)
    model = mlp()
    model[1].eval()  # a frozen-statistics layer whose parameters still train
    provider = ExactProvider()
    module = provider.wrap(model)
    with pytest.raises(RuntimeError, match="eval mode.*1"):
        drive_epoch(provider, module, torch.optim.SGD(model.parameters(), lr=0.0), x, y, 8)
    # weight tying and shared parameters: tests/test_stats_invariant.py


def test_make_provider_names_the_allowed_values():
    assert ESTIMATORS == ("exact", "epoch", "microbatch")
    assert make_provider("exact", "paper").bn == "paper"
    with pytest.raises(ValueError, match="exact.*epoch.*microbatch"):
        make_provider("ghost")
    with pytest.raises(ValueError, match="contribution.*paper"):
        make_provider("exact", bn="eval")
    with pytest.raises(ValueError, match="micro_batches"):
        make_provider("microbatch", micro_batches=1)


def test_zero_gradient_sum_gives_infinite_diversity():
    stats = exact_mod.make_grad_stats(2.0, 0.0, 4, "exact", 0.0)
    assert math.isinf(stats.diversity)
    assert math.isnan(exact_mod.make_grad_stats(0.0, 0.0, 4, "exact", 0.0).diversity)
