"""End to end: `divebench run` then `divebench report`; the table's numbers equal what
this test recomputes from metrics.jsonl; W&B offline without network or login."""

from __future__ import annotations

import json
import statistics

from conftest import read_rows, run_cli


def test_run_then_report_numbers_match_metrics(tmp_path) -> None:
    res = run_cli("run", "suite=synthetic", "policy=sgd-small,adabatch", "seeds=0,1", "epochs=3",
                  "n_samples=1500", "adabatch.resize_freq=1", f"results_dir={tmp_path}", "wandb=off", "-q")
    assert res.exit_code == 0, res.output
    assert "report: " in res.output and "sgd-small" in res.output
    out = tmp_path / "rep"
    res = run_cli("report", f"results_dir={tmp_path}", f"out={out}")
    assert res.exit_code == 0, res.output
    for f in ("report.md", "report.html", "scores.json"):
        assert (out / f).stat().st_size > 0
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "synthetic-val_acc-vs-time.png" in pngs and "synthetic-batch_size-vs-epoch.png" in pngs
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html  # self-contained
    # recompute final accuracy (mean over seeds, %) from the files alone
    finals: dict[str, list[float]] = {}
    for run in (tmp_path / "synthetic").iterdir():
        entry = json.loads((run / "summary.json").read_text())["entry"]
        finals.setdefault(entry, []).append(read_rows(run)[-1]["val_acc"])
    md = (out / "report.md").read_text()
    for entry, accs in finals.items():
        mean_pct = f"{100 * statistics.mean(accs):.2f}"
        line = next(x for x in md.splitlines() if x.startswith(f"| {entry} "))
        assert mean_pct in line, (entry, mean_pct, line)


def test_wandb_auto_without_login_goes_offline(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc, no W&B login
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "home" / ".config" / "wandb"))
    res = run_cli("run", "suite=synthetic", "policy=sgd-small", "seeds=0", "epochs=2", "n_samples=800",
                  f"results_dir={tmp_path / 'r'}", "wandb=auto", "--no-report", "-q")
    assert res.exit_code == 0, res.output
    (run,) = (tmp_path / "r" / "synthetic").iterdir()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "complete" and len(read_rows(run)) == 2
    assert summary["wandb"]["mode"] == "offline"
    assert summary["wandb"]["sync_command"].startswith("wandb sync ")
    offline = list((run / "wandb").glob("offline-run-*"))
    assert offline, "no offline W&B run directory"
    assert list(offline[0].glob("*.wandb")), "the offline run holds no .wandb file"
