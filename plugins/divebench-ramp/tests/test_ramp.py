"""The example plugin's own tests: the schedule, and a real run through divebench."""

from __future__ import annotations

import json

from click.testing import CliRunner
from divebench_ramp.plugin import Ramp, RampConfig

from divebench.cli import main
from divebench.policy import SuiteContext


def test_ramp_goes_from_b0_to_bmax() -> None:
    ctx = SuiteContext("x", 1000, 16, 256, 5, 0.1, 0)
    p = Ramp(RampConfig(), ctx)
    sizes = [p.batch_size_at(e) for e in range(5)]
    assert sizes == [16, 32, 64, 128, 256]
    assert sizes == sorted(sizes)


def test_ramp_runs_through_divebench(tmp_path) -> None:
    res = CliRunner().invoke(main, [
        "run", "suite=synthetic", "policy=ramp", "seeds=0", "epochs=3", "n_samples=2000",
        "batch_size=16", "max_batch_size=64", f"results_dir={tmp_path}", "wandb=off", "--no-report", "-q",
    ])
    assert res.exit_code == 0, res.output
    (run,) = (tmp_path / "synthetic").iterdir()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["batch_size"] for r in rows] == [16, 32, 64]
    env = json.loads((run / "env.json").read_text())
    assert env["plugins"]["ramp"] == "0.1.0"
