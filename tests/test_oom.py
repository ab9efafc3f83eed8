"""Out of memory: the micro-batch halves and the batch is redone with gradient
accumulation (same gradient); if one sample does not fit, the run stops clearly."""

from __future__ import annotations

import json

import torch
from conftest import read_rows, run_cli
from torch import nn

from divebench.hookspecs import hookimpl


class MemoryCapped(nn.Module):
    """A linear model that raises the real torch.OutOfMemoryError above `cap` samples,
    as a GPU allocator would for a batch that does not fit."""

    def __init__(self, d: int, classes: int, cap: int) -> None:
        super().__init__()
        self.cap = cap
        self.lin = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] > self.cap:
            raise torch.OutOfMemoryError(f"simulated: {x.shape[0]} samples > {self.cap}")
        return self.lin(x.flatten(1))


def _plugin(cap: int):
    class P:
        @staticmethod
        @hookimpl
        def divebench_models():
            return {"capped": lambda c, shape, opts: MemoryCapped(shape[0], c, cap)}

    return P


def _run(tmp_path, name: str, model: str, *extra: str):
    return run_cli("run", "suite=synthetic", f"model={model}", "policy=sgd-large,divebatch", "seeds=0", "epochs=2",
                   "n_samples=1000", "max_batch_size=256", "divebatch.resize_freq=1", *extra,
                   f"results_dir={tmp_path / name}", "wandb=off", "--no-report", "-q")


def test_oom_halves_micro_batch_and_matches_unconstrained_run(tmp_path, register_plugin) -> None:
    register_plugin("capped", _plugin(cap=50))
    assert _run(tmp_path, "capped", "capped").exit_code == 0
    register_plugin("capped", _plugin(cap=10**9))
    assert _run(tmp_path, "free", "capped").exit_code == 0
    for entry in ("sgd-large", "divebatch"):
        (a,) = (tmp_path / "capped" / "synthetic").glob(f"{entry}-*")
        (b,) = (tmp_path / "free" / "synthetic").glob(f"{entry}-*")
        ra, rb = read_rows(a), read_rows(b)
        for x, y in zip(ra, rb, strict=True):
            assert x["batch_size"] == y["batch_size"]
            assert abs(x["train_loss"] - y["train_loss"]) < 1e-5
            assert abs(x["val_acc"] - y["val_acc"]) < 1e-9 or abs(x["val_loss"] - y["val_loss"]) < 1e-4
    log = (next((tmp_path / "capped" / "synthetic").glob("sgd-large-*")) / "run.log").read_text()
    assert "out of memory at micro-batch 256; retrying the batch with micro-batches of 128" in log
    assert "micro-batches of 32" in log


def test_oom_with_one_sample_stops_the_run_clearly(tmp_path, register_plugin) -> None:
    register_plugin("capped", _plugin(cap=0))
    res = _run(tmp_path, "zero", "capped")
    assert res.exit_code == 1
    assert "out of memory with a micro-batch of one sample" in res.output
    for run in (tmp_path / "zero" / "synthetic").iterdir():
        assert json.loads((run / "summary.json").read_text())["status"] == "failed"
