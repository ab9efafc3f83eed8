"""`divebench compare`: regressions between two real result sets (planted by editing a
copy of real run folders), bad input, and `divebench bench` without a checkout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from divebench import cli
from divebench.compare import CompareError, parse_fail_on


@pytest.fixture(scope="module")
def base_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real runs: synthetic suite, two entries x two seeds, two short epochs."""
    out = tmp_path_factory.mktemp("base")
    res = CliRunner().invoke(cli.main, [
        "run", "suite=synthetic", "policy=sgd-small,adabatch", "seeds=0,1", "epochs=2",
        "n_samples=2000", "wandb=off", "device=cpu", f"results_dir={out}", "--no-report", "-q",
    ])
    assert res.exit_code == 0, res.output
    return out


def copy_of(base: Path, tmp_path: Path) -> Path:
    new = tmp_path / "new"
    shutil.copytree(base, new)
    return new


def edit_entry(results: Path, entry: str, summary_edit, row_edit) -> int:
    """Apply edits to every run folder of ``entry``; returns how many were edited."""
    n = 0
    for run in sorted((results / "synthetic").glob(f"{entry}-s*")):
        s = json.loads((run / "summary.json").read_text())
        summary_edit(s)
        (run / "summary.json").write_text(json.dumps(s))
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        for r in rows:
            row_edit(r)
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        n += 1
    return n


def slow_down(results: Path, entry: str, factor: float) -> None:
    def times(d: dict) -> None:
        for k in ("train_time_s", "epoch_train_time_s"):
            if k in d:
                d[k] *= factor

    assert edit_entry(results, entry, times, times) == 2


def drop_accuracy(results: Path, entry: str, points: float) -> None:
    def summary(d: dict) -> None:
        d["final_val_acc"] -= points / 100
        d["best_val_acc"] -= points / 100

    def row(r: dict) -> None:
        r["val_acc"] -= points / 100

    assert edit_entry(results, entry, summary, row) == 2


def compare(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(cli.main, ["compare", *args])
    return res.exit_code, res.output


def test_identical_result_sets_pass(base_results: Path, tmp_path: Path) -> None:
    code, out = compare(str(base_results), str(copy_of(base_results, tmp_path)))
    assert code == 0, out
    assert "no regressions (2 entries compared)" in out
    assert "REGRESSION" not in out


def test_planted_slowdown_is_named(base_results: Path, tmp_path: Path) -> None:
    new = copy_of(base_results, tmp_path)
    slow_down(new, "sgd-small", 1.10)
    code, out = compare(str(base_results), str(new), "--suite", "synthetic", "--fail-on", "time:5%,acc:0.5")
    assert code == 1, out
    verdict = out.split("1 regression:")[1]
    assert "synthetic sgd-small: time:" in verdict and "(+10.0%)" in verdict
    assert "adabatch" not in verdict  # the untouched entry is not blamed


def test_slowdown_under_the_limit_passes(base_results: Path, tmp_path: Path) -> None:
    new = copy_of(base_results, tmp_path)
    slow_down(new, "sgd-small", 1.04)
    code, out = compare(str(base_results), str(new), "--fail-on", "time:5%")
    assert code == 0, out
    assert "(+4.0%)" in out
    slow_down(new, "sgd-small", 1.10)  # now +14.4% in all: a looser limit lets it through
    assert compare(str(base_results), str(new), "--fail-on", "time:15%")[0] == 0
    assert compare(str(base_results), str(new), "--fail-on", "time:14%")[0] == 1


def test_planted_accuracy_drop_is_named(base_results: Path, tmp_path: Path) -> None:
    new = copy_of(base_results, tmp_path)
    drop_accuracy(new, "adabatch", 1.0)
    code, out = compare(str(base_results), str(new))
    assert code == 1, out
    verdict = out.split("1 regression:")[1]
    assert "synthetic adabatch: final val acc:" in verdict and "(-1.00 pp)" in verdict
    # a drop of 1 point passes a limit of 1.5 points, and an accuracy gain never fails
    assert compare(str(base_results), str(new), "--fail-on", "acc:1.5")[0] == 0
    assert compare(str(new), str(base_results))[0] == 0


def test_both_regressions_are_listed(base_results: Path, tmp_path: Path) -> None:
    new = copy_of(base_results, tmp_path)
    slow_down(new, "sgd-small", 1.10)
    drop_accuracy(new, "adabatch", 1.0)
    code, out = compare(str(base_results), str(new))
    assert code == 1
    assert "2 regressions:" in out


def test_entry_missing_in_new_is_a_regression(base_results: Path, tmp_path: Path) -> None:
    new = copy_of(base_results, tmp_path)
    for run in (new / "synthetic").glob("adabatch-s*"):
        shutil.rmtree(run)
    code, out = compare(str(base_results), str(new))
    assert code == 1
    assert "synthetic adabatch: no complete run in NEW" in out


def test_settings_difference_is_a_note(base_results: Path, tmp_path: Path) -> None:
    new = copy_of(base_results, tmp_path)
    for cfg in (new / "synthetic").glob("sgd-small-s*/config.yaml"):
        cfg.write_text(cfg.read_text().replace("epochs: 2", "epochs: 3"))
    code, out = compare(str(base_results), str(new))
    assert code == 0
    assert "note: synthetic sgd-small: settings differ: epochs 2 -> 3" in out


@pytest.mark.parametrize("bad, says", [
    ("time", "is not METRIC:LIMIT"),
    ("time:abc", "is not METRIC:LIMIT"),
    ("acc:1%", "percentage points"),
    ("time:5pp", "percent"),
    ("tme:5%", "did you mean 'time'"),
    ("time:5%,time:3%", "given twice"),
    ("", "empty"),
])
def test_malformed_fail_on_exits_2(base_results: Path, bad: str, says: str) -> None:
    code, out = compare(str(base_results), str(base_results), "--fail-on", bad)
    assert code == 2
    assert says in out and out.startswith("divebench: error: --fail-on")


def test_parse_fail_on() -> None:
    assert parse_fail_on("time:5%,acc:0.5") == {"time": 5.0, "acc": 0.5}
    assert parse_fail_on(" steps:10 , samples:2.5% ,acc:1pp") == {"steps": 10.0, "samples": 2.5, "acc": 1.0}
    with pytest.raises(CompareError):
        parse_fail_on("time:-5%")


def test_bad_folders_exit_2(base_results: Path, tmp_path: Path) -> None:
    code, out = compare(str(tmp_path / "missing"), str(base_results))
    assert code == 2 and "BASE results folder" in out and "does not exist" in out
    (tmp_path / "empty").mkdir()
    code, out = compare(str(base_results), str(tmp_path / "empty"))
    assert code == 2 and "holds no run folders" in out
    code, out = compare(str(base_results), str(base_results), "--suite", "mnist1d")
    assert code == 2 and "of suite mnist1d" in out


def test_bench_without_a_checkout_exits_2(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(cli, "bench_dir", lambda: tmp_path / "site-packages" / "bench")
    res = CliRunner().invoke(cli.main, ["bench"])
    assert res.exit_code == 2
    assert "no bench/ folder" in res.output and "source checkout" in res.output
