"""The speed paths that also run on CPU: channels_last image models and ``amp=bf16``.

Image runs train in channels_last on every device, and ``amp=bf16`` autocasts on the
training device, CPU included. The per-sample statistics must give the same numbers in
either layout, and close ones under bf16; a whole suite must run with both.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import read_rows, run_cli
from torch import nn

from divebench.models.resnet import build_resnet18_cifar
from divebench.stats import make_provider
from divebench.stats.reference import drive_epoch


class _ForwardAutocast(nn.Module):
    def __init__(self, module: nn.Module, enabled: bool) -> None:
        super().__init__()
        self.module = module
        self.enabled = enabled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.enabled):
            return self.module(x).float()


def _exact_stats(layout: str, amp: bool, bn: str = "contribution") -> tuple[float, float]:
    """Σ||g_i||² and ||Σ B_t ḡ_t||² of one measured epoch at fixed weights."""
    torch.manual_seed(0)
    model = build_resnet18_cifar(10, (3, 32, 32), {})
    x = torch.randn(12, 3, 16, 16)
    y = torch.randint(0, 10, (12,))
    if layout == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    provider = make_provider("exact", bn=bn)
    module = provider.wrap(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # fixed weights: every variant sees the same model
    # as divebench.loop does it: the forward under autocast, the backward outside it
    (stats,) = drive_epoch(provider, _ForwardAutocast(module, amp), opt, x, y, batch_size=4)
    assert stats is not None
    return stats.sum_sq_norms, stats.grad_sum_sq_norm


@pytest.mark.parametrize("bn", ["contribution", "paper"])
def test_exact_statistics_do_not_depend_on_the_memory_layout(bn: str) -> None:
    contiguous = _exact_stats("contiguous", amp=False, bn=bn)
    channels_last = _exact_stats("channels_last", amp=False, bn=bn)
    assert channels_last == pytest.approx(contiguous, rel=1e-4)  # float32 summation order only


def test_exact_statistics_under_cpu_bf16_autocast_are_close_to_float32() -> None:
    full = _exact_stats("channels_last", amp=False)
    bf16 = _exact_stats("channels_last", amp=True)
    assert all(v > 0 for v in bf16)
    # bf16 keeps 8 bits of mantissa: the activations and backprops are rounded to ~0.4 %,
    # and the norms summed over 11M parameters stay within a few percent
    assert bf16 == pytest.approx(full, rel=0.05)
    assert bf16 != full  # autocast really ran in bf16


@pytest.mark.slow
def test_cifar10_suite_runs_measured_and_growing_policies_with_bf16_on_cpu(tmp_path: Path) -> None:
    # the measured policy (per-sample hooks under autocast) and a growing batch; the
    # other policies' bf16 paths are the same loop (tests/test_suites.py runs them in fp32)
    res = run_cli("run", "suite=cifar10", "data=fake", "epochs=2", "subset=32", "seeds=1", "device=cpu",
                  "amp=bf16", "threads=1", "batch_size=8", "max_batch_size=16", "divebatch.resize_freq=1",
                  "policy=divebatch,adabatch", "adabatch.resize_freq=1", f"results_dir={tmp_path}", "wandb=off",
                  "--no-report", "-q")
    assert res.exit_code == 0, res.output
    runs = sorted((tmp_path / "cifar10").iterdir())
    assert len(runs) == 2
    for run in runs:
        summary = json.loads((run / "summary.json").read_text())
        assert summary["status"] == "complete", summary
        assert json.loads((run / "env.json").read_text())["memory_format"] == "channels_last"
        assert yaml.safe_load((run / "config.yaml").read_text())["amp"] == "bf16"
        rows = read_rows(run)
        assert all(0.0 <= r["val_acc"] <= 1.0 and r["train_loss"] == r["train_loss"] for r in rows)
        if summary["entry"] == "divebatch":
            assert rows[0]["measured"] and rows[0]["n_grad_diversity"] > 0


@pytest.mark.parametrize("mode", ["contribution", "paper"])
def test_batchnorm_sampler_reduces_channels_last_inputs_in_place(mode: str) -> None:
    from divebench.stats import bn

    torch.manual_seed(0)
    layer = nn.BatchNorm2d(6)
    layer.running_mean.uniform_(-1, 1)
    layer.running_var.uniform_(0.5, 2)
    bn.set_bn_mode(layer, mode)
    x = torch.randn(5, 6, 7, 3)
    d = torch.randn(5, 6, 7, 3)
    x_cl, d_cl = (t.contiguous(memory_format=torch.channels_last) for t in (x, d))
    assert bn._is_channels_last(x_cl) and not bn._is_channels_last(x)
    assert bn._flatten(x_cl, True).data_ptr() == x_cl.data_ptr()  # a view: nothing copied
    assert bn._flatten(x_cl, True).is_contiguous()
    ref = bn.compute_batch_norm_grad_sample(layer, [x], d)
    got = bn.compute_batch_norm_grad_sample(layer, [x_cl], d_cl)
    mixed = bn.compute_batch_norm_grad_sample(layer, [x_cl], d)  # one side NCHW: the copying path
    for p in (layer.weight, layer.bias):
        assert got[p].shape == (5, 6)
        torch.testing.assert_close(got[p], ref[p], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mixed[p], ref[p], rtol=1e-5, atol=1e-5)
    # and the terms are what the module doc defines: Σ_s δ·x̂ with the batch (or running) statistics
    if mode == "contribution":
        xhat = (x - x.mean((0, 2, 3), keepdim=True)) / (x.var((0, 2, 3), unbiased=False, keepdim=True) + layer.eps).sqrt()
    else:
        xhat = (x - layer.running_mean[None, :, None, None]) / (layer.running_var[None, :, None, None] + layer.eps).sqrt()
    torch.testing.assert_close(got[layer.weight], (d * xhat).sum((2, 3)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[layer.bias], d.sum((2, 3)))


def _have_cpp_compiler() -> bool:
    import shutil

    try:
        from torch._inductor import cpp_builder

        return shutil.which(cpp_builder.get_cpp_compiler()) is not None
    except Exception:  # inductor cannot even name a compiler: it cannot build either
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _have_cpp_compiler(), reason="torch.compile on CPU needs a C++ compiler")
def test_compile_true_gives_the_same_divebatch_run(tmp_path: Path) -> None:
    """``compile=true`` wraps the provider-wrapped model in torch.compile: the hooks must
    still see every layer, so the measured n·Δ̂ and the batch sizes they lead to match
    the eager run's."""
    common = ("run", "suite=synthetic", "policy=divebatch", "seeds=0", "epochs=2",
              "divebatch.resize_freq=1", "wandb=off", "--no-report", "-q")
    out = {}
    for compiled in ("false", "true"):
        res = run_cli(*common, f"compile={compiled}", f"results_dir={tmp_path / compiled}")
        assert res.exit_code == 0, res.output
        (run,) = (tmp_path / compiled / "synthetic").iterdir()
        assert json.loads((run / "summary.json").read_text())["status"] == "complete"
        out[compiled] = read_rows(run)
    eager, compiled_rows = out["false"], out["true"]
    assert [r["batch_size"] for r in compiled_rows] == [r["batch_size"] for r in eager]
    assert len({r["batch_size"] for r in eager}) > 1  # the batch grew: the statistics drove it
    assert eager[0]["measured"]  # epoch 1 (the last epoch is never measured)
    for a, b in zip(compiled_rows, eager, strict=True):
        assert a["measured"] == b["measured"]
        if b["measured"]:
            assert a["n_grad_diversity"] == pytest.approx(b["n_grad_diversity"], rel=1e-4)
        assert a["val_acc"] == pytest.approx(b["val_acc"], abs=1e-3)


def test_a_resumed_run_keeps_the_layout_it_started_with() -> None:
    from divebench.engine import _use_channels_last

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert _use_channels_last((3, 32, 32), cpu, None)  # new image runs: channels_last
    assert not _use_channels_last((40,), cpu, None)  # 1-D inputs: as they are
    # a resumed run: the layout its env.json recorded
    assert not _use_channels_last((3, 32, 32), cpu, {"memory_format": "contiguous"})
    assert _use_channels_last((3, 32, 32), cpu, {"memory_format": "channels_last"})
    # a run from before env.json recorded the layout: channels_last was CUDA-only then
    assert not _use_channels_last((3, 32, 32), cpu, {"device": "cpu"})
    assert _use_channels_last((3, 32, 32), cuda, {"device": "cpu"})


def test_bf16_on_a_cpu_without_native_bf16_is_warned_about(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from divebench import engine

    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: False)
    res = run_cli("run", "suite=synthetic", "dataset=cifar10", "data=fake", "subset=64", "model=small_cnn",
                  "policy=sgd-small", "seeds=0", "epochs=1", "batch_size=32", "amp=bf16", "device=cpu",
                  f"results_dir={tmp_path}", "wandb=off", "--no-report", "-q")
    assert res.exit_code == 0, res.output
    (run,) = (tmp_path / "synthetic").iterdir()
    assert "amp=bf16: this CPU has no native bf16" in (run / "run.log").read_text()
    assert json.loads((run / "summary.json").read_text())["status"] == "complete"
