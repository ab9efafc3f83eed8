"""The CUDA path (skipped without a GPU; scripts/gpu_check.sh runs these on one)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import read_rows, run_cli

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_cifar10_fake_on_cuda_every_policy(tmp_path, amp) -> None:
    res = run_cli("run", "suite=cifar10", "data=fake", "epochs=2", "subset=2048", "seeds=1", "device=cuda",
                  f"amp={amp}", "batch_size=128", "max_batch_size=512", "divebatch.resize_freq=1",
                  "adabatch.resize_freq=1", f"results_dir={tmp_path}", "wandb=off", "--no-report", "-q")
    assert res.exit_code == 0, res.output
    for run in (tmp_path / "cifar10").iterdir():
        summary = json.loads((run / "summary.json").read_text())
        assert summary["status"] == "complete", summary
        env = json.loads((run / "env.json").read_text())
        assert env["cuda"] and "cuda" in env["device"] and env["memory_format"] == "channels_last"
        for r in read_rows(run):
            assert r["peak_memory_mb"] > 0
            total = r["train_time_s"] + r["eval_time_s"] + r["other_time_s"]
            assert abs(total - r["wall_time_s"]) <= 0.02 * r["wall_time_s"]
        if summary["entry"] == "divebatch":
            assert read_rows(run)[0]["measured"]


def test_exact_norms_on_cuda_match_cpu() -> None:
    from divebench.models.resnet import build_resnet18_cifar
    from divebench.stats import make_provider
    from divebench.stats.reference import drive_epoch

    torch.manual_seed(0)
    x = torch.randn(24, 3, 32, 32)
    y = torch.randint(0, 10, (24,))
    out = {}
    for dev in ("cpu", "cuda"):
        torch.manual_seed(0)
        model = build_resnet18_cifar(10, (3, 32, 32), {}).to(dev)
        provider = make_provider("exact")
        module = provider.wrap(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)  # fixed weights: same Δ on both devices
        (stats,) = drive_epoch(provider, module, opt, x.to(dev), y.to(dev), batch_size=8)
        out[dev] = (stats.sum_sq_norms, stats.grad_sum_sq_norm)
    assert out["cuda"] == pytest.approx(out["cpu"], rel=1e-3)  # TF32/cudnn vs CPU float32
