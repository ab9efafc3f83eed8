"""The built-in policies' rules, as their authors ran them (algorithms.md)."""

from __future__ import annotations

import math

import pytest
from conftest import read_rows, run_cli

from divebench.policies.adabatch import AdaBatch, AdaBatchConfig
from divebench.policies.divebatch import DiveBatch, DiveBatchConfig, divebatch_rule
from divebench.policies.sgd import FixedSGD, SGDConfig
from divebench.policy import GradStats, PolicyState, SuiteContext

CTX = SuiteContext("t", dataset_size=10_000, initial_batch_size=128, max_batch_size=2048, epochs=100, base_lr=0.1, seed=0)


def _state(epoch: int, stats: GradStats | None = None, b: int = 128) -> PolicyState:
    return PolicyState(epoch, 0, 0, 0.0, CTX.dataset_size, b, 0.1, 1.0, None, stats)


def _stats(n_div: float) -> GradStats:
    return GradStats(1.0, 1.0, CTX.dataset_size, n_div / CTX.dataset_size, n_div, "exact", 0.0)


def test_rule_truncates_never_decreases_and_clips() -> None:
    assert divebatch_rule(128, 3000.0, 0.1, 2048) == 300  # δ·n·Δ = 300.0
    assert divebatch_rule(128, 3009.9, 0.1, 2048) == 300  # truncated, not rounded
    assert divebatch_rule(128, 1281.0, 0.1, 2048) == 128  # 128.1 -> 128
    assert divebatch_rule(500, 1000.0, 0.1, 2048) == 500  # never decreases
    assert divebatch_rule(500, 1e9, 0.1, 2048) == 2048  # clipped at B_max
    assert divebatch_rule(128, 700.0, 0.1, 2048) == 128  # no lower clamp below B: stays
    assert divebatch_rule(200, 3000.0, 0.1, 2048) == 300  # not a power of two
    for bad in (math.nan, math.inf, -math.inf):
        assert divebatch_rule(128, bad, 0.1, 2048) == 2048


def test_divebatch_measures_last_epoch_of_each_window_until_bmax() -> None:
    p = DiveBatch(DiveBatchConfig(delta=0.1, resize_freq=5), CTX)
    measured = []
    sizes = []
    stats = None
    for epoch in range(30):
        d = p.decide_epoch(_state(epoch, stats))
        measured.append(d.measure)
        sizes.append(d.batch_size)
        # epoch 4 measures n·Δ = 5000 -> 500; epoch 9 measures 1e6 -> 2048 (B_max)
        stats = _stats(5000.0 if epoch == 4 else 1e6) if d.measure else None
    assert [e for e, m in enumerate(measured) if m] == [4, 9]  # none after B reaches B_max
    assert sizes[:5] == [128] * 5 and sizes[5:10] == [500] * 5 and sizes[10:] == [2048] * 20


def test_divebatch_lr_scaling_and_state_round_trip() -> None:
    for scaling, expect in (("none", 1.0), ("linear", 512 / 128), ("sqrt", 2.0)):
        p = DiveBatch(DiveBatchConfig(delta=0.1, resize_freq=1, lr_scaling=scaling), CTX)
        p.decide_epoch(_state(0))
        d = p.decide_epoch(_state(1, _stats(5120.0)))
        assert d.batch_size == 512 and d.lr_multiplier == pytest.approx(expect)
    q = DiveBatch(DiveBatchConfig(delta=0.1, resize_freq=1), CTX)
    q.load_state_dict(p.state_dict())
    assert q.decide_epoch(_state(2)).batch_size == 512


def test_adabatch_paper_variant() -> None:
    p = AdaBatch(AdaBatchConfig(resize_freq=20, lr_scaling="linear"), CTX)
    sizes = [p.decide_epoch(_state(e)).batch_size for e in (0, 19, 20, 40, 60, 80, 99)]
    assert sizes == [128, 128, 256, 512, 1024, 2048, 2048]
    assert p.decide_epoch(_state(40)).lr_multiplier == 4.0
    assert AdaBatch(AdaBatchConfig(resize_freq=20), CTX).decide_epoch(_state(40)).lr_multiplier == 1.0


def test_adabatch_original_variant_and_its_baseline() -> None:
    p = AdaBatch(AdaBatchConfig(resize_freq=20, variant="original"), CTX)
    mults = [p.decide_epoch(_state(e)).lr_multiplier for e in (0, 20, 40)]
    assert mults == pytest.approx([1.0, 0.75, 0.5625])
    base = FixedSGD(SGDConfig(lr_decay=0.375, decay_every=20), CTX)
    d = [base.decide_epoch(_state(e)) for e in (0, 20, 40)]
    assert [x.lr_multiplier for x in d] == pytest.approx([1.0, 0.375, 0.140625])
    # LR / B of AdaBatch-original equals the baseline's at every doubling
    for e, x in zip((0, 20, 40), d, strict=True):
        ada = p.decide_epoch(_state(e))
        assert ada.lr_multiplier / ada.batch_size == pytest.approx(x.lr_multiplier / x.batch_size)


def test_sgd_linear_rescale() -> None:
    p = FixedSGD(SGDConfig(batch_size=2048, lr_scaling="linear"), CTX)
    d = p.decide_epoch(_state(0))
    assert (d.batch_size, d.lr_multiplier) == (2048, 16.0)


def test_divebatch_end_to_end_follows_its_logged_diversity(tmp_path) -> None:
    """The batch-size trajectory of a real run equals the rule applied to the Δ̂ it logged."""
    res = run_cli("run", "suite=mnist1d", "policy=divebatch", "seeds=0", "epochs=6", "subset=1000",
                  "divebatch.resize_freq=2", "divebatch.delta=1.0", "batch_size=16", "max_batch_size=1000",
                  f"results_dir={tmp_path}", "wandb=off", "--no-report", "-q")
    assert res.exit_code == 0, res.output
    (run,) = (tmp_path / "mnist1d").iterdir()
    rows = read_rows(run)
    b, bmax, delta = 16, 1000, 1.0
    for r in rows:
        assert r["batch_size"] == b
        assert r["measured"] == (r["epoch"] % 2 == 0 and b < bmax)
        if r["measured"]:
            assert r["n_grad_diversity"] == pytest.approx(1000 * r["grad_diversity"])
            b = divebatch_rule(b, r["n_grad_diversity"], delta, bmax)
    assert rows[-1]["batch_size"] > 16, "the policy never acted: choose settings where it does"
