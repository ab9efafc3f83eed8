"""The training loop, the clock, the sampler and the policy contract's enforcement."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest
import torch
from conftest import read_rows, run_cli
from torch import nn

from divebench.clock import Clock
from divebench.data.base import DataBundle
from divebench.data.sampler import PermutationSampler
from divebench.engine import lr_schedule
from divebench.hookspecs import hookimpl
from divebench.loop import Setup, _accumulate
from divebench.policy import Decision, Policy, PolicyConfig, SuiteContext


def _bundle(n: int = 96, d: int = 12, classes: int = 3) -> DataBundle:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return DataBundle(x, y, x[:16], y[:16], classes, (d,))


def _setup(model: nn.Module, data: DataBundle, max_micro: int,
           dtype: torch.dtype = torch.float32) -> Setup:
    from divebench.policies.sgd import FixedSGD, SGDConfig

    ctx = SuiteContext("t", data.train_size, 8, 64, 1, 0.1, 0)
    return Setup(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                 policy=FixedSGD(SGDConfig(), ctx), plugin="builtin", provider=None, data=data,
                 device=torch.device("cpu"), epochs=1, base_lr=lambda e: 0.1,
                 max_micro_batch=max_micro, eval_batch_size=64, seed=0, dtype=dtype)


def test_micro_batches_give_the_full_batch_gradient() -> None:
    data = _bundle()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 3)).double()
    data.x_train = data.x_train.double()
    idx = torch.arange(90)  # 90 = 7 micro-batches of 13 or 12: uneven on purpose
    grads = {}
    for max_micro in (90, 13):
        s = _setup(model, data, max_micro, torch.float64)
        _accumulate(s, idx, False, torch.Generator(), max_micro)
        grads[max_micro] = torch.cat([p.grad.flatten() for p in model.parameters()])
    # reference: one plain full-batch backward
    model.zero_grad()
    nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx]).backward()
    ref = torch.cat([p.grad.flatten() for p in model.parameters()])
    for g in grads.values():
        assert torch.linalg.vector_norm(g - ref) / torch.linalg.vector_norm(ref) < 1e-6


def test_sampler_is_a_permutation_for_any_batch_size() -> None:
    s = PermutationSampler(50, seed=3, device=torch.device("cpu"))
    s.start_epoch(0)
    seen = []
    for b in (7, 1, 20, 64):
        idx = s.next_batch(b)
        if idx is None:
            break
        seen += idx.tolist()
    assert sorted(seen) == list(range(50))
    s2 = PermutationSampler(50, seed=3, device=torch.device("cpu"))
    s2.start_epoch(0)
    assert s2.next_batch(50).tolist() == seen  # same (seed, epoch) -> same order
    s2.start_epoch(1)
    assert s2.next_batch(50).tolist() != seen


@pytest.mark.parametrize(
    ("kind", "extra", "expect"),
    [
        ("constant", {}, [1.0, 1.0, 1.0, 1.0]),
        ("cosine", {}, [1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))]),
        ("multistep", {"lr_milestones": [1, 3], "lr_gamma": 0.2}, [1.0, 0.2, 0.2, 0.04]),
        ("step", {"lr_step_size": 2, "lr_gamma": 0.1}, [1.0, 1.0, 0.1, 0.1]),
    ],
)
def test_lr_schedules(kind, extra, expect) -> None:
    v = {"lr": 1.0, "epochs": 4, "lr_schedule": kind, "lr_milestones": [], "lr_gamma": 0.1, "lr_step_size": 30} | extra
    f = lr_schedule(v)
    assert [f(e) for e in range(4)] == pytest.approx(expect)


def test_clock_regions_refuse_nesting() -> None:
    c = Clock(torch.device("cpu"))
    with c.region("train"), pytest.raises(RuntimeError):
        with c.region("eval"):
            pass


def test_clock_regions_add_up_to_wall_time(tmp_path) -> None:
    res = run_cli("run", "suite=mnist1d", "policy=sgd-small,divebatch", "seeds=0", "epochs=3", "subset=512",
                  "divebatch.resize_freq=1", f"results_dir={tmp_path}", "wandb=off", "--no-report", "-q")
    assert res.exit_code == 0, res.output
    for run in (tmp_path / "mnist1d").iterdir():
        for r in read_rows(run):
            total = r["train_time_s"] + r["eval_time_s"] + r["other_time_s"]
            assert abs(total - r["wall_time_s"]) <= 0.02 * r["wall_time_s"], r
            assert r["train_time_s"] > 0 and r["eval_time_s"] > 0


@dataclass
class BadConfig(PolicyConfig):
    at_epoch: int = 1
    value: int = 0


class BadPolicy(Policy):
    name = "bad"
    description = "returns an invalid batch size at a given epoch"
    config_class = BadConfig

    def decide_epoch(self, state):
        b = self.config.value if state.epoch == self.config.at_epoch else 8
        return Decision(batch_size=b)


class BadPlugin:
    @staticmethod
    @hookimpl
    def divebench_policies():
        return [BadPolicy]


def test_invalid_decision_mid_run_fails_that_run_only(tmp_path, register_plugin) -> None:
    register_plugin("badplug", BadPlugin)
    res = run_cli("run", "suite=synthetic", "policy=bad,sgd-small", "seeds=0", "epochs=2", "n_samples=600",
                  f"results_dir={tmp_path}", "wandb=off", "--no-report", "-q")
    assert res.exit_code == 1
    assert "policy 'bad' (plugin 'badplug') returned batch_size=0; expected an int >= 1" in res.output
    runs = {json.loads((p / "summary.json").read_text())["entry"]: p for p in (tmp_path / "synthetic").iterdir()}
    bad = json.loads((runs["bad"] / "summary.json").read_text())
    assert bad["status"] == "failed" and bad["epochs_completed"] == 1
    assert "Traceback" in (runs["bad"] / "run.log").read_text()
    good = json.loads((runs["sgd-small"] / "summary.json").read_text())
    assert good["status"] == "complete"  # the suite went on


def test_divergence_is_recorded_and_suite_continues(tmp_path) -> None:
    res = run_cli("run", "suite=synthetic", "policy=sgd-small,sgd-large", "seeds=0", "epochs=3", "n_samples=600",
                  "lr=3e38", "max_batch_size=128", f"results_dir={tmp_path}", "wandb=off", "--no-report", "-q")
    assert res.exit_code == 0, res.output
    statuses = sorted(json.loads((p / "summary.json").read_text())["status"] for p in (tmp_path / "synthetic").iterdir())
    assert statuses == ["diverged", "diverged"]


def test_metrics_rows_have_every_field(tmp_path) -> None:
    from divebench.results import METRIC_FIELDS

    res = run_cli("run", "suite=synthetic", "policy=adabatch", "adabatch.resize_freq=1", "seeds=0", "epochs=3",
                  "n_samples=1000", "batch_size=16", f"results_dir={tmp_path}", "wandb=off", "--no-report", "-q")
    assert res.exit_code == 0, res.output
    (run,) = (tmp_path / "synthetic").iterdir()
    rows = read_rows(run)
    assert [r["batch_size"] for r in rows] == [16, 32, 64]
    for r in rows:
        assert set(METRIC_FIELDS) <= set(r)
    assert [r["samples_seen"] for r in rows] == [700, 1400, 2100]  # 70% of 1000 per epoch
    assert rows[-1]["step"] == math.ceil(700 / 16) + math.ceil(700 / 32) + math.ceil(700 / 64)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["final_val_acc"] == rows[-1]["val_acc"]
    for f in ("config.yaml", "env.json"):
        assert (run / f).exists()


def test_progress_lines_on_a_terminal_and_quiet_otherwise(capsys, monkeypatch) -> None:
    from divebench.engine import Console

    row = {"epoch": 3, "batch_size": 64, "lr": 0.05, "train_loss": 0.4321, "val_acc": 0.912,
           "train_time_s": 12.3, "wall_time_s": 15.0}
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    Console(quiet=False).epoch("[mnist1d divebatch seed 0]", 20, row)
    err = capsys.readouterr().err
    assert "epoch   3/20" in err and "B=64" in err and "lr=0.05" in err and "val_acc=91.20%" in err
    assert "loss=0.4321" in err and "train 12.3s" in err and "wall 15.0s" in err
    Console(quiet=True).epoch("x", 20, row)
    monkeypatch.setattr("sys.stderr.isatty", lambda: False)
    Console(quiet=False).epoch("x", 20, row)
    assert capsys.readouterr().err == ""
