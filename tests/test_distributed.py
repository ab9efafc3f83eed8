"""Data-parallel runs under torchrun on CPU (gloo, 2 processes) against one process.

In float64 a 2-process run of the synthetic and MNIST-1D suites has the same batch-size
trajectory, steps, samples and measured-step counts as the 1-process run, and its
losses, accuracies and measured n·Δ̂ agree to 1e-9 relative (measured: ≤ 1.6e-15; only
the order of the gradient sums differs: DDP's all-reduce adds the two ranks' halves).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import read_rows

TOL = 1e-9


def _runs(root: Path) -> dict[str, tuple[dict, list[dict]]]:
    out = {}
    for d in root.glob("*/*"):
        if (d / "summary.json").exists():
            s = json.loads((d / "summary.json").read_text())
            out[s["entry"]] = (s, read_rows(d))
    return out


def _torchrun(nproc: int, args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "divebench", "run", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _one(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "divebench", "run", *args], capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize(("suite", "extra"), [
    ("synthetic", ["policy=sgd-small,adabatch,divebatch,gns,normtest", "n_samples=1000"]),
    ("mnist1d", ["policy=divebatch,gns,smith", "subset=1000"]),
])
def test_two_processes_equal_one(tmp_path: Path, suite: str, extra: list[str]) -> None:
    args = [f"suite={suite}", *extra, "seeds=0", "epochs=2", "dtype=float64", "wandb=off", "threads=1",
            "divebatch.resize_freq=1", "adabatch.resize_freq=1", "gns.interval=3", "normtest.interval=3",
            "--no-report", "-q"]
    one = _one([*args, f"results_dir={tmp_path / 'one'}"])
    assert one.returncode == 0, one.stderr
    two = _torchrun(2, [*args, f"results_dir={tmp_path / 'two'}"])
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _runs(tmp_path / "one"), _runs(tmp_path / "two")
    assert set(a) == set(b) and len(list((tmp_path / "two").glob("*/*"))) == len(a)  # one folder per run
    for entry, (sa, ra) in a.items():
        sb, rb = b[entry]
        assert sb["status"] == "complete", sb
        for key in ("batch_size", "step", "samples_seen", "measured", "measured_steps", "lr"):
            assert [r[key] for r in ra] == [r[key] for r in rb], (entry, key)
        for key in ("train_loss", "val_loss", "val_acc", "train_acc", "n_grad_diversity", "sum_sq_norms"):
            for x, y in zip(ra, rb, strict=True):
                assert (x[key] is None) == (y[key] is None), (entry, key)
                if x[key] is not None:
                    assert y[key] == pytest.approx(x[key], rel=TOL, abs=1e-300), (entry, key, x["epoch"])
        if entry in ("gns", "normtest"):  # per-step statistics: each measured step's sums
            sa_steps = [json.loads(x) for x in (next((tmp_path / "one").glob(f"*/{entry}-*")) / "steps.jsonl")
                        .read_text().splitlines()]
            sb_steps = [json.loads(x) for x in (next((tmp_path / "two").glob(f"*/{entry}-*")) / "steps.jsonl")
                        .read_text().splitlines()]
            assert [s["step"] for s in sa_steps] == [s["step"] for s in sb_steps]
            for x, y in zip(sa_steps, sb_steps, strict=True):
                assert y["sum_sq_norms"] == pytest.approx(x["sum_sq_norms"], rel=1e-6)
                assert y["grad_sum_sq_norm"] == pytest.approx(x["grad_sum_sq_norm"], rel=1e-6)


def test_microbatch_statistics_are_refused_in_a_data_parallel_run() -> None:
    """The engine hands every provider the group (set_dist); microbatch has no
    distributed definition yet and says so (the run then fails with that line)."""
    from divebench.distributed import Dist
    from divebench.stats import make_provider

    group = Dist(0, 2, 0, torch.device("cpu"))
    with pytest.raises(ValueError, match="estimator=microbatch is not defined for data-parallel runs yet"):
        make_provider("microbatch").set_dist(group)
    make_provider("epoch").set_dist(group)  # reads only the all-reduced gradient
    make_provider("exact").set_dist(group)
