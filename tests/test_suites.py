"""The shipped suites: MNIST-1D reaches its published accuracy; every paper suite runs
end to end on fake data of the real shapes, for every policy."""

from __future__ import annotations

import json

import pytest
from conftest import read_rows, run_cli


def test_mnist1d_cnn_sgd_reaches_93_percent(tmp_path) -> None:
    """MNIST-1D's authors report about 94% for this CNN; the suite as shipped (20 epochs)
    ends at 95.0 ± 0.17% over seeds 0-2 (README), so 93% leaves 2 points for other CPUs."""
    res = run_cli("run", "suite=mnist1d", "policy=sgd", "seeds=0", f"results_dir={tmp_path}",
                  "wandb=off", "--no-report", "-q")
    assert res.exit_code == 0, res.output
    (run,) = (tmp_path / "mnist1d").iterdir()
    assert read_rows(run)[-1]["val_acc"] >= 0.93


@pytest.mark.slow
@pytest.mark.parametrize(
    ("suite", "extra"),
    [
        # every policy once, on CIFAR-10's ResNet-18; CIFAR-100 (the same model and loop,
        # 100 classes) runs in test_cifar_runs_both_cifar_suites, Tiny-ImageNet's paper
        # preset in test_tinyimagenet_paper_preset_runs
        ("cifar10", []),
        ("tinyimagenet", ["preset=native", "policy=divebatch,adabatch"]),
    ],
)
def test_paper_suites_run_on_fake_data(tmp_path, suite, extra) -> None:
    base = {"data": "fake", "epochs": "2", "subset": "32", "seeds": "1", "batch_size": "8",
            "max_batch_size": "16", "divebatch.resize_freq": "1", "adabatch.resize_freq": "1"}
    base |= dict(x.split("=", 1) for x in extra)
    args = ["run", f"suite={suite}", *(f"{k}={v}" for k, v in base.items()),
            f"results_dir={tmp_path}", "wandb=off", "--no-report", "-q"]
    res = run_cli(*args)
    assert res.exit_code == 0, res.output
    runs = list((tmp_path / suite).iterdir())
    assert len(runs) == len(base.get("policy", "a,b,c,d").split(","))
    for run in runs:
        summary = json.loads((run / "summary.json").read_text())
        assert summary["status"] == "complete", summary
        rows = read_rows(run)
        if summary["entry"] == "divebatch":
            assert rows[0]["measured"] and rows[0]["n_grad_diversity"] > 0  # BN models measure too
        if summary["entry"] == "adabatch":
            assert [r["batch_size"] for r in rows] == [8, 16]


def test_tinyimagenet_paper_preset_runs(tmp_path) -> None:
    """224-px inputs and a 1000-way head: the slowest suite on a CPU, so one small run."""
    # 2 epochs: DiveBatch measures epoch 1 (never the run's last)
    res = run_cli("run", "suite=tinyimagenet", "preset=paper", "data=fake", "epochs=2", "subset=8", "seeds=1",
                  "batch_size=8", "policy=divebatch", "divebatch.resize_freq=1", "eval_batch_size=64",
                  f"results_dir={tmp_path}", "wandb=off", "--no-report", "-q")
    assert res.exit_code == 0, res.output
    (run,) = (tmp_path / "tinyimagenet").iterdir()
    assert read_rows(run)[0]["measured"]


def test_cifar_runs_both_cifar_suites(tmp_path) -> None:
    res = run_cli("run", "suite=cifar", "data=fake", "epochs=1", "subset=32", "seeds=1", "policy=sgd-small",
                  "batch_size=16", f"results_dir={tmp_path}", "wandb=off", "-q")
    assert res.exit_code == 0, res.output
    assert "== cifar10 ==" in res.output and "== cifar100 ==" in res.output
    assert {p.name for p in tmp_path.iterdir()} >= {"cifar10", "cifar100", "report"}
