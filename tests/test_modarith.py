"""The modarith suite: modular addition generated on the machine, a small transformer,
every built-in policy end to end with exact statistics."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import read_rows, run_cli

from divebench.data.modarith import MODULUS, build_modarith
from divebench.models.transformer import build_transformer


def test_data_is_every_equation_once() -> None:
    b = build_modarith({}, torch.device("cpu"), 0)
    p = MODULUS
    x = torch.cat([b.x_train, b.x_val])
    y = torch.cat([b.y_train, b.y_val])
    assert x.shape == (p * p, 3) and b.x_train.shape[0] == p * p // 2
    assert torch.equal(y, (x[:, 0] + x[:, 1]) % p) and bool((x[:, 2] == p).all())
    assert len({(int(a), int(c)) for a, c, _ in x.tolist()}) == p * p  # no pair twice
    again = build_modarith({}, torch.device("cpu"), 7)  # the run seed does not move the split
    assert torch.equal(again.x_train, b.x_train)


def test_transformer_takes_token_ids() -> None:
    model = build_transformer(MODULUS, (3,), {})
    out = model(torch.tensor([[1, 2, MODULUS], [5, 96, MODULUS]]))
    assert out.shape == (2, MODULUS)
    with pytest.raises(ValueError, match="token sequences"):
        build_transformer(10, (3, 32, 32), {})


@pytest.mark.slow
def test_every_policy_runs_with_exact_statistics(tmp_path) -> None:
    res = run_cli("run", "suite=modarith", "epochs=2", "subset=256", "seeds=0", "batch_size=16",
                  "max_batch_size=64", "divebatch.resize_freq=1", "divebatch.delta=0.5", "adabatch.resize_freq=1",
                  "gns.interval=2", "gns.warmup=1", "normtest.interval=2",
                  f"results_dir={tmp_path}", "wandb=off", "--no-report", "-q")
    assert res.exit_code == 0, res.output
    runs = {json.loads((r / "summary.json").read_text())["entry"]: r for r in (tmp_path / "modarith").iterdir()}
    assert set(runs) == {"sgd-small", "sgd-large", "adabatch", "divebatch", "gns", "normtest", "smith"}
    for run in runs.values():
        assert json.loads((run / "summary.json").read_text())["status"] == "complete"
    rows = read_rows(runs["divebatch"])
    assert rows[0]["measured"] and rows[0]["n_grad_diversity"] > 0
    assert rows[1]["batch_size"] > 16  # the measured statistics moved the batch size
    for name in ("gns", "normtest"):  # per-step statistics of the transformer, exact
        steps = [json.loads(x) for x in (runs[name] / "steps.jsonl").read_text().splitlines()]
        assert steps and all(s["estimator"] == "exact" and s["sum_sq_norms"] > 0 for s in steps)
