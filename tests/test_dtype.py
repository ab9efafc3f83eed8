"""The ``dtype=`` run key: float64 trains in float64 end to end, is refused with bf16
autocast, and run folders from before the key existed still resume."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from conftest import read_rows, run_cli

COMMON = ("run", "suite=synthetic", "policy=divebatch", "seeds=0", "epochs=2", "n_samples=400",
          "divebatch.resize_freq=1", "wandb=off", "--no-report", "-q")


def test_float64_is_refused_with_bf16_autocast(tmp_path: Path) -> None:
    res = run_cli("run", "suite=synthetic", "dtype=float64", "amp=bf16", f"results_dir={tmp_path}", "-q")
    assert res.exit_code == 2
    assert "dtype=float64 with amp=bf16 is contradictory" in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "synthetic").exists()
    res = run_cli("run", "suite=synthetic", "dtype=float16", f"results_dir={tmp_path}", "-q")
    assert res.exit_code == 2 and "float32" in res.output and "float64" in res.output


def test_float64_run_trains_in_float64(tmp_path: Path) -> None:
    """Weights, inputs and the measured statistics are float64: the checkpoint's tensors
    are, and the run differs from the float32 one only by rounding."""
    out = {}
    for dtype in ("float32", "float64"):
        res = run_cli(*COMMON, f"dtype={dtype}", f"results_dir={tmp_path / dtype}")
        assert res.exit_code == 0, res.output
        (run,) = (tmp_path / dtype / "synthetic").iterdir()
        assert yaml.safe_load((run / "config.yaml").read_text())["dtype"] == dtype
        state = torch.load(run / "checkpoint.pt", weights_only=False)
        weights = [t for t in state["model"].values() if t.is_floating_point()]
        assert weights and {t.dtype for t in weights} == {getattr(torch, dtype)}
        out[dtype] = read_rows(run)
    a, b = out["float32"], out["float64"]
    assert a[0]["measured"] and b[0]["measured"]
    rel = abs(a[0]["n_grad_diversity"] - b[0]["n_grad_diversity"]) / b[0]["n_grad_diversity"]
    assert 0 < rel < 1e-3  # the same run, rounded differently
    assert [r["batch_size"] for r in a] == [r["batch_size"] for r in b]


def test_a_run_from_before_the_dtype_key_still_matches(tmp_path: Path) -> None:
    """A config.yaml without ``dtype`` was a float32 run: resume=auto finds it as the same
    config (a complete run is then skipped), and not as a float64 one."""
    args = (*COMMON, f"results_dir={tmp_path}")
    res = run_cli(*args)
    assert res.exit_code == 0, res.output
    (run,) = (tmp_path / "synthetic").iterdir()
    config = yaml.safe_load((run / "config.yaml").read_text())
    del config["dtype"]  # the run folder as written before the key existed
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    assert json.loads((run / "summary.json").read_text())["status"] == "complete"
    res = run_cli(*args, "resume=auto")
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "synthetic").iterdir())) == 1  # matched: nothing new ran
    res = run_cli(*args, "dtype=float64", "resume=auto")
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "synthetic").iterdir())) == 2  # float64 is another config
