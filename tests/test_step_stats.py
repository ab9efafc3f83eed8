"""Per-step statistics (stats_scope='step') and the rules built on them: the providers'
StepStats against an independent float64 per-sample loop, measurement only on the steps
a policy asks for, refusals with one line, and gns / normtest / smith / AdaScale
decisions re-derived by hand from the run's own files."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import read_rows, run_cli
from torch import nn

from divebench.hookspecs import hookimpl
from divebench.policies.common import adascale_gain, noise_and_signal
from divebench.policies.smith import Smith, SmithConfig
from divebench.policy import Decision, Policy, PolicyConfig, PolicyState, StepStats, SuiteContext
from divebench.stats import make_provider


def _data(n: int = 12, d: int = 6, classes: int = 3) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d, 8), nn.Tanh(), nn.Linear(8, classes)).double()
    return model, torch.randn(n, d, dtype=torch.float64), torch.randint(0, classes, (n,))


def _per_sample(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Σ_i ||g_i||² and ||Σ_i g_i||², one autograd.grad per sample (no provider code)."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    sq = 0.0
    for i in range(x.shape[0]):
        loss = nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, params)
        sq += sum(float((g * g).sum()) for g in grads)
        total = [t + g for t, g in zip(total, grads, strict=True)]
    return sq, sum(float((t * t).sum()) for t in total)


def _one_step(estimator: str, micro: int, measure: bool = True) -> tuple[StepStats | None, nn.Module]:
    model, x, y = _data()
    ref = _per_sample(model, x, y)
    provider = make_provider(estimator, micro_batches=micro)
    module = provider.wrap(model)
    provider.start_epoch(False, x.shape[0])
    provider.start_step(measure)
    b = x.shape[0]
    k = provider.min_micro_batches(b) if measure else 1
    for part in torch.arange(b).tensor_split(k):
        m = part.shape[0]
        loss = nn.functional.cross_entropy(module(x[part]), y[part])
        (loss * (m / b)).backward()
        provider.after_micro_backward(m, m / b)
    if measure:
        provider.after_batch(b)
    stats = provider.end_step(7)
    assert provider.end_epoch() is None  # step scope keeps nothing for the epoch
    return stats, ref


@pytest.mark.parametrize(("estimator", "micro"), [("exact", 4), ("microbatch", 12)])
def test_step_stats_match_a_per_sample_loop(estimator: str, micro: int) -> None:
    """exact, and microbatch with one sample per micro-batch (where (★) is exact)."""
    stats, (sq, gsum) = _one_step(estimator, micro)
    assert stats is not None and stats.step == 7 and stats.batch_size == 12
    assert stats.sum_sq_norms == pytest.approx(sq, rel=1e-9)
    assert stats.grad_sum_sq_norm == pytest.approx(gsum, rel=1e-9)
    assert stats.small_batch_size == pytest.approx(1.0)
    assert stats.small_sq_norm == pytest.approx(sq / 12, rel=1e-9)
    trace = (sq - gsum / 12) / 11
    assert stats.trace_cov == pytest.approx(trace, rel=1e-9)
    assert stats.true_grad_sq_norm == pytest.approx(gsum / 144 - trace / 12, rel=1e-9)


def test_microbatch_step_two_batch_quantities() -> None:
    """k = 4 micro-batches of 3: small batch size 3, P/A the mean ||ĝ_j||²."""
    stats, _ = _one_step("microbatch", 4)
    assert stats is not None and stats.small_batch_size == pytest.approx(3.0)
    model, x, y = _data()
    means = []
    for part in torch.arange(12).tensor_split(4):
        loss = nn.functional.cross_entropy(model(x[part]), y[part])
        grads = torch.autograd.grad(loss, list(model.parameters()))
        means.append(sum(float((g * g).sum()) for g in grads))
    assert stats.small_sq_norm == pytest.approx(sum(means) / 4, rel=1e-9)


def test_an_unmeasured_step_costs_no_hooks() -> None:
    stats, _ = _one_step("exact", 4, measure=False)
    assert stats is None


class EveryThird(Policy):
    """Measures steps 0, 3, 6, ...; records what it was handed."""

    name = "everythird"
    description = "test"
    config_class = PolicyConfig
    stats = "per_sample_sq_norms"
    stats_scope = "step"
    per_step = True
    seen: list[int] = []

    def decide_epoch(self, state: PolicyState) -> Decision:
        return self._d(state)

    def decide_step(self, state: PolicyState) -> Decision | None:
        return self._d(state)

    def _d(self, state: PolicyState) -> Decision:
        if state.step_stats is not None:
            EveryThird.seen.append(state.step_stats.step)
        return Decision(state.batch_size, 1.0, state.step % 3 == 0)


class StepWithoutPerStep(EveryThird):
    name = "noperstep"
    per_step = False


class StepWithEpochEstimator(EveryThird):
    name = "epochest"

    def stats_options(self):
        return {"estimator": "epoch"}


class Plugin:
    @staticmethod
    @hookimpl
    def divebench_policies():
        return [EveryThird, StepWithoutPerStep, StepWithEpochEstimator]


def test_only_the_asked_steps_are_measured_and_bad_setups_fail_alone(tmp_path, register_plugin) -> None:
    register_plugin("stepplug", Plugin)
    EveryThird.seen = []
    res = run_cli("run", "suite=synthetic", "policy=everythird,noperstep,epochest", "seeds=0", "epochs=2",
                  "n_samples=600", "batch_size=64", f"results_dir={tmp_path}", "wandb=off", "--no-report")
    assert res.exit_code == 1
    assert "policy 'noperstep' (plugin 'stepplug'): stats_scope='step' needs per_step = True" in res.output
    assert "policy 'epochest' (plugin 'stepplug'): stats_options() estimator='epoch' has no per-step" in res.output
    assert "Traceback" not in res.output
    runs = {json.loads((r / "summary.json").read_text())["entry"]: r for r in (tmp_path / "synthetic").iterdir()}
    assert json.loads((runs["everythird"] / "summary.json").read_text())["status"] == "complete"
    rows = read_rows(runs["everythird"])
    steps = [json.loads(x) for x in (runs["everythird"] / "steps.jsonl").read_text().splitlines()]
    total = rows[-1]["step"]
    assert [s["step"] for s in steps] == list(range(0, total, 3))
    assert sum(r["measured_steps"] for r in rows) == len(steps)
    assert not any(r["measured"] for r in rows)  # no epoch statistics in step scope
    # each handed over at the next decision, and at every decision until another step is done
    assert sorted(set(EveryThird.seen)) == [s["step"] for s in steps]
    assert EveryThird.seen[:2] == [0, 3]
    for s in steps:  # the derived columns follow from the sums
        b = s["batch_size"]
        trace = (s["sum_sq_norms"] - s["grad_sum_sq_norm"] / b) / (b - 1)
        assert s["trace_cov"] == pytest.approx(trace, rel=1e-12)


def _steps(run_dir) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "steps.jsonl").read_text().splitlines()]


def _replay(steps: list[dict], n: int, b0: int, rule) -> None:
    """Every step measured (interval 1): the rule applied to row i by hand gives the
    batch of row i+1 (clipped by what is left of the epoch: the ragged last batch)."""
    b = b0
    used = {}
    for i, s in enumerate(steps):
        left = n - used.get(s["epoch"], 0)
        assert s["batch_size"] == min(b, left), (i, s, b)
        used[s["epoch"]] = used.get(s["epoch"], 0) + s["batch_size"]
        b = rule(s, b)


@pytest.mark.parametrize("policy", ["gns", "normtest"])
def test_per_step_rules_re_derived_by_hand(tmp_path, policy: str) -> None:
    args = ["run", "suite=synthetic", f"policy={policy}", "seeds=0", "epochs=2", "n_samples=1000",
            "batch_size=16", "max_batch_size=200", f"{policy}.interval=1", f"results_dir={tmp_path}",
            "wandb=off", "--no-report", "-q"]
    if policy == "gns":
        args += ["gns.warmup=3", "gns.ema=0.5"]
    res = run_cli(*args)
    assert res.exit_code == 0, res.output
    (run,) = (tmp_path / "synthetic").iterdir()
    steps = _steps(run)
    n = 700  # the synthetic suite's train split of n_samples=1000 (70%)
    assert read_rows(run)[0]["stats_samples"] is None
    assert len(steps) >= 3

    if policy == "normtest":
        def rule(s: dict, b: int) -> int:
            m = s["batch_size"]
            var = (s["sum_sq_norms"] - s["grad_sum_sq_norm"] / m) / (m - 1)  # tr of the sample variance
            gbar = s["grad_sum_sq_norm"] / m**2
            if var / m <= 0.81 * gbar:
                return b
            return min(max(math.ceil(var / (0.81 * gbar)), b), 200)
    else:
        acc = {"t": 0.0, "g": 0.0, "k": 0}

        def rule(s: dict, b: int) -> int:
            m = s["batch_size"]
            var = (s["sum_sq_norms"] - s["grad_sum_sq_norm"] / m) / (m - 1)
            g2 = s["grad_sum_sq_norm"] / m**2 - var / m
            acc["t"] = 0.5 * acc["t"] + 0.5 * var
            acc["g"] = 0.5 * acc["g"] + 0.5 * g2
            acc["k"] += 1
            c = 1 - 0.5 ** acc["k"]
            if acc["k"] < 3 or acc["g"] / c <= 0:
                return b
            return min(max(math.ceil((acc["t"] / c) / (acc["g"] / c)), b), 200)

    _replay(steps, n, 16, rule)
    assert read_rows(run)[-1]["batch_size"] > 16, "the batch never grew: the replay checked no change"


def test_smith_turns_lr_decays_into_batch_growth(tmp_path) -> None:
    res = run_cli("run", "suite=synthetic", "policy=smith", "seeds=0", "epochs=5", "n_samples=1000",
                  "batch_size=16", "max_batch_size=1000", "lr=0.1", "lr_schedule=multistep",
                  "lr_milestones=2,4", "lr_gamma=0.1", f"results_dir={tmp_path}", "wandb=off",
                  "--no-report", "-q")
    assert res.exit_code == 0, res.output
    (run,) = (tmp_path / "synthetic").iterdir()
    rows = read_rows(run)
    # epochs 1-2: B0 at LR 0.1; 3-4: B ×10 at LR 0.01·10; 5: B would be 1600, capped at
    # the 700 samples of the epoch (the sampler's clip), LR 0.001·1000/16
    assert [r["batch_size"] for r in rows] == [16, 16, 160, 160, 700]
    assert [r["lr"] for r in rows] == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.001 * 1000 / 16])
    ctx = SuiteContext("t", 700, 16, 1000, 5, 0.1, 0, lr_by_epoch=(0.1, 0.1, 0.01, 0.01, 0.001))
    smith = Smith(SmithConfig(), ctx)
    state = PolicyState(4, 0, 0, 0.0, 700, 160, 0.1, 10.0, None, None)
    assert smith.decide_epoch(state) == Decision(1000, 1000 / 16, False)


def test_adascale_gain_by_hand() -> None:
    # tr Σ = 8, ||G||² = 0.5, B0 = 4, B = 16 (S = 4): σ² = 2, r = (2 + 0.5)/(0.5 + 0.5) = 2.5
    assert adascale_gain(8.0, 0.5, 16, 4) == pytest.approx(2.5)
    assert adascale_gain(8.0, 0.5, 4, 4) == 1.0  # S = 1
    assert adascale_gain(8.0, -0.1, 16, 4) == 4.0  # no signal estimate: the linear rule
    assert adascale_gain(0.0, 0.5, 16, 4) == 1.0  # no noise: nothing to gain
    assert adascale_gain(math.nan, 0.5, 16, 4) == 1.0
    trace, g2 = noise_and_signal(10.0, 18.0, 3)  # Σ||g_i||² = 10, ||Σg_i||² = 18
    assert trace == pytest.approx((10 - 6) / 2) and g2 == pytest.approx(2 - 2 / 3)


def test_adascale_multiplier_follows_the_logged_steps(tmp_path) -> None:
    res = run_cli("run", "suite=synthetic", "policy=normtest", "seeds=0", "epochs=1", "n_samples=600",
                  "batch_size=8", "max_batch_size=64", "normtest.interval=1", "normtest.lr_scaling=adascale",
                  f"results_dir={tmp_path}", "wandb=off", "--no-report", "-q")
    assert res.exit_code == 0, res.output
    (run,) = (tmp_path / "synthetic").iterdir()
    row = read_rows(run)[-1]
    # decide_step runs before every step and once more when the epoch has no batch left:
    # the epoch's last decision applied the last measured step
    last = _steps(run)[-1]
    m = last["batch_size"]
    var = (last["sum_sq_norms"] - last["grad_sum_sq_norm"] / m) / (m - 1)
    g2 = last["grad_sum_sq_norm"] / m**2 - var / m
    scale = row["batch_size"] / 8
    assert scale > 1, "the batch never grew: nothing to check"
    want = scale if g2 <= 0 else min(max((var / 8 + g2) / (var / 8 / scale + g2), 1), scale)
    assert row["lr_multiplier"] == pytest.approx(want, rel=1e-9)
