"""cross.<key>=v1,v2: one command for a statistic × rule × LR-coupling matrix, without
duplicate runs, shown as one table and a Pareto chart."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli

from divebench.config import parse_overrides, resolve
from divebench.plugins import get_registry
from divebench.report.plots import pareto_points
from divebench.scoring import load_runs, score_all


def _entries(*tokens: str) -> dict[str, dict]:
    cfg = resolve(parse_overrides(list(tokens)), get_registry())
    return {e.name: {"policy": e.policy, **e.params} for e in cfg.entries}


def test_cross_expands_only_policies_with_the_key() -> None:
    got = _entries("suite=mnist1d", "policy=sgd-small,adabatch,divebatch,gns",
                   "cross.estimator=exact,epoch,microbatch", "cross.lr_scaling=none,adascale")
    # the baseline is not crossed; adabatch has lr_scaling (not estimator) but no
    # 'adascale' value, so it runs once, as adabatch+none
    assert "sgd-small" in got and got["sgd-small"]["policy"] == "sgd"
    assert {n for n in got if n.startswith("divebatch")} == {
        f"divebatch+{e}+{s}" for e in ("exact", "epoch", "microbatch") for s in ("none", "adascale")}
    # gns has no estimator 'epoch': those combinations are skipped, not duplicated
    assert {n for n in got if n.startswith("gns")} == {
        f"gns+{e}+{s}" for e in ("exact", "microbatch") for s in ("none", "adascale")}
    assert {n for n in got if n.startswith("adabatch")} == {"adabatch+none"}
    assert got["divebatch+epoch+adascale"]["estimator"] == "epoch"
    assert got["divebatch+epoch+adascale"]["lr_scaling"] == "adascale"
    assert got["divebatch+epoch+adascale"]["delta"] == 0.005  # the suite's entry settings kept
    assert len(got) == 1 + 6 + 4 + 1


@pytest.mark.parametrize(("tokens", "msg"), [
    (["cross.estimatr=exact"], "cross.estimatr: no policy of this run has a key 'estimatr'"),
    (["policy=gns", "cross.estimator=epoch"], "gns.estimator='epoch' is not valid: expected exact | microbatch"),
    (["cross.lr_scaling="], "cross.lr_scaling= is empty"),
    (["cross.lr_scaling=none,none"], "lists a value twice"),
    (["policy=sgd-small", "cross.batch_size=16,32"], "only the baseline entry 'sgd-small' has 'batch_size'"),
    (["policy=gns,divebatch", "cross.estimator=epoch"], "entry 'gns' (policy gns) would not run at all"),
    (["policy=divebatch", "divebatch.estimator=epoch", "cross.estimator=exact,epoch"],
     "divebatch.estimator and cross.estimator are both given"),
])
def test_bad_cross_is_one_line(tokens: list[str], msg: str) -> None:
    res = run_cli("run", "suite=mnist1d", *tokens, "--show-config")
    assert res.exit_code == 2
    assert msg in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_ablation_report_has_the_matrix_and_a_pareto_chart(tmp_path) -> None:
    res = run_cli("run", "suite=synthetic", "policy=sgd-small,divebatch,normtest", "cross.lr_scaling=none,sqrt",
                  "seeds=0,1", "epochs=2", "n_samples=600", "normtest.interval=2", "divebatch.resize_freq=1",
                  f"results_dir={tmp_path}", "wandb=off", "-q")
    assert res.exit_code == 0, res.output
    entries = {json.loads((r / "summary.json").read_text())["entry"] for r in (tmp_path / "synthetic").iterdir()}
    assert entries == {"sgd-small", "divebatch+none", "divebatch+sqrt", "normtest+none", "normtest+sqrt"}
    md = (tmp_path / "report" / "report.md").read_text()
    assert "### Ablation matrix" in md
    assert "| entry | rule | lr_scaling | seeds |" in md
    assert "| normtest+sqrt | normtest | sqrt | 2 |" in md
    png = tmp_path / "report" / "synthetic-pareto.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    score = score_all(load_runs(tmp_path))["synthetic"]
    points = pareto_points(score)
    assert set(points) == entries - {"sgd-small"}
    assert all(len(p) == 2 for p in points.values())  # one point per seed
    base = score.entry("sgd-small")
    for name, pts in points.items():  # the seed points average to the table's Δ pp
        mean_dpp = sum(p[0] for p in pts) / len(pts)
        assert mean_dpp == pytest.approx(score.entry(name).acc_diff_pp, abs=1e-9), (name, base)
