"""The statistics side of the policy contract: defaults for a policy that declares
statistics without options, a bad option fails only its own run, the logged sums
re-derive the rule, and DiveBatch does not measure the run's last epoch."""

from __future__ import annotations

import json
import math

import pytest
from conftest import read_rows, run_cli

from divebench.hookspecs import hookimpl
from divebench.policies.divebatch import divebatch_rule
from divebench.policy import STATS_OPTIONS, Decision, Policy, PolicyConfig, PolicyState
from divebench.stats import ExactProvider, provider_from_options


class NormTestLike(Policy):
    """Declares statistics, does not override stats_options()."""

    name = "needsstats"
    description = "measures every epoch, keeps B0"
    config_class = PolicyConfig
    stats = "per_sample_sq_norms"

    def decide_epoch(self, state: PolicyState) -> Decision:
        return Decision(state.batch_size, 1.0, True)


class BogusOptions(NormTestLike):
    name = "bogus"

    def stats_options(self):
        return {"estimator": "bogus"}


class Plugin:
    @staticmethod
    @hookimpl
    def divebench_policies():
        return [NormTestLike, BogusOptions]


def test_default_options_and_their_checks() -> None:
    assert STATS_OPTIONS == {"estimator": "exact", "bn": "contribution", "micro_batches": 4}
    assert isinstance(provider_from_options({}), ExactProvider)
    for bad, msg in (({"estimator": "bogus"}, "estimator='bogus' is not a statistics estimator"),
                     ({"estimatr": "exact"}, "unknown key(s) ['estimatr']"),
                     ({"micro_batches": 1}, "micro_batches=1; expected an int >= 2"),
                     ([], "expected a dict")):
        with pytest.raises(ValueError, match=None) as err:
            provider_from_options(bad)
        assert msg in str(err.value)


def test_a_policy_without_options_runs_and_a_bad_one_fails_alone(tmp_path, register_plugin) -> None:
    register_plugin("statsplug", Plugin)
    res = run_cli("run", "suite=synthetic", "policy=bogus,needsstats,sgd-small", "seeds=0", "epochs=2",
                  "n_samples=600", f"results_dir={tmp_path}", "wandb=off", "--no-report")
    assert res.exit_code == 1  # a run failed; the suite went on
    assert "policy 'bogus' (plugin 'statsplug'): estimator='bogus' is not a statistics estimator" in res.output
    runs = {json.loads((r / "summary.json").read_text())["entry"]: r for r in (tmp_path / "synthetic").iterdir()}
    assert set(runs) == {"bogus", "needsstats", "sgd-small"}
    bogus = json.loads((runs["bogus"] / "summary.json").read_text())
    assert bogus["status"] == "failed" and "Traceback" in (runs["bogus"] / "run.log").read_text()
    for name in ("needsstats", "sgd-small"):
        assert json.loads((runs[name] / "summary.json").read_text())["status"] == "complete"
    rows = read_rows(runs["needsstats"])
    assert all(r["measured"] for r in rows)
    for r in rows:  # the logged sums give Δ̂ and n·Δ̂ back
        assert r["sum_sq_norms"] / r["grad_sum_sq_norm"] == pytest.approx(r["grad_diversity"], rel=1e-12)
        assert r["stats_samples"] * r["grad_diversity"] == pytest.approx(r["n_grad_diversity"], rel=1e-12)
    assert all(r["sum_sq_norms"] is None for r in read_rows(runs["sgd-small"]))


def test_divebatch_rule_re_derived_from_the_file_and_last_epoch_not_measured(tmp_path) -> None:
    res = run_cli("run", "suite=synthetic", "policy=divebatch", "seeds=0", "epochs=4", "n_samples=800",
                  "divebatch.resize_freq=1", "divebatch.delta=0.5", f"results_dir={tmp_path}", "wandb=off",
                  "--no-report", "-q")
    assert res.exit_code == 0, res.output
    (run,) = (tmp_path / "synthetic").iterdir()
    rows = read_rows(run)
    assert [r["measured"] for r in rows] == [True, True, True, False]  # epoch 4 is the last
    assert len({r["batch_size"] for r in rows}) > 1
    b_max = 1024
    for prev, nxt in zip(rows, rows[1:], strict=False):
        if prev["measured"]:
            n_delta = prev["stats_samples"] * prev["sum_sq_norms"] / prev["grad_sum_sq_norm"]
            assert nxt["batch_size"] == divebatch_rule(prev["batch_size"], n_delta, 0.5, b_max)
            assert math.isfinite(n_delta)
