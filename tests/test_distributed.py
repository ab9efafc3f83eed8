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
    ("mnist1d", ["policy=divebatch,smith", "subset=600"]),  # gns/normtest: synthetic
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
    for entry, (_sa, ra) in a.items():
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


@pytest.mark.slow
def test_a_killed_rank_stops_the_group_and_resume_continues(tmp_path: Path) -> None:
    """SIGKILL to rank 1 mid-run: torchrun names rank 1 and ends the group within the bound;
    the run is interrupted (recorded by rank 0, or stale), and resume=auto under torchrun
    then ends with the uninterrupted run's metrics."""
    import signal
    import time

    args = ["suite=synthetic", "policy=divebatch", "seeds=0", "epochs=6", "dtype=float64",
            "wandb=off", "threads=1", "divebatch.resize_freq=2", "--no-report", "-q"]
    straight = _one([*args, f"results_dir={tmp_path / 'straight'}"])
    assert straight.returncode == 0, straight.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "divebench", "run", *args, f"results_dir={tmp_path / 'two'}"]
    agent = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    run_dir = None
    while time.time() - t0 < 240:
        found = list((tmp_path / "two").glob("synthetic/*/metrics.jsonl"))
        if found and len(read_rows(found[0].parent)) >= 2:
            run_dir = found[0].parent
            break
        assert agent.poll() is None, "the run ended before a rank could be killed"
        time.sleep(0.05)
    assert run_dir is not None
    workers = subprocess.run(["ps", "--ppid", str(agent.pid), "-o", "pid="], capture_output=True,
                             text=True).stdout.split()
    rank_of = {}
    for pid in workers:  # torchrun gives each worker its RANK in the environment
        env_vars = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        rank_of[int(pid)] = next(int(v.split(b"=", 1)[1]) for v in env_vars if v.startswith(b"RANK="))
    assert sorted(rank_of.values()) == [0, 1], rank_of
    killed_at = time.time()
    os.kill(next(p for p, r in rank_of.items() if r == 1), signal.SIGKILL)
    _out, err = agent.communicate(timeout=120)
    assert time.time() - killed_at < 60, "the surviving rank did not stop in time"
    assert agent.returncode != 0 and "rank      : 1" in err, err[-2000:]
    # Rank 0 records the run interrupted when its broken collective raises before torchrun
    # stops it; when torchrun's SIGTERM/SIGKILL comes first, the folder keeps 'running' with
    # a free writer lock, which readers report as interrupted (stale). Both resume.
    from divebench.scoring import read_run

    summary = json.loads((run_dir / "summary.json").read_text())
    if summary["status"] == "interrupted":
        assert "lost a rank" in summary["error"], summary
    else:
        assert summary["status"] == "running", (summary, err[-2000:])
    assert read_run(run_dir).status == "interrupted"
    assert len(read_rows(run_dir)) < 6
    again = _torchrun(2, [*args, f"results_dir={tmp_path / 'two'}", "resume=auto"])
    assert again.returncode == 0, again.stderr[-3000:]
    (ref,) = (tmp_path / "straight" / "synthetic").iterdir()
    a, b = read_rows(ref), read_rows(run_dir)
    assert [r["batch_size"] for r in a] == [r["batch_size"] for r in b] and len(b) == 6
    for x, y in zip(a, b, strict=True):
        for key in ("train_loss", "val_loss", "val_acc"):
            assert y[key] == pytest.approx(x[key], rel=TOL), (key, x["epoch"])
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "complete"
