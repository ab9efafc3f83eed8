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


def test_shards_partition_the_matrix_and_report_merges_them(tmp_path) -> None:
    common = ["suite=synthetic", "policy=sgd-small,adabatch", "seeds=0,1", "epochs=1", "n_samples=600",
              "wandb=off", "-q"]
    seen = []
    for i in (1, 2, 3):
        res = run_cli("run", *common, f"results_dir={tmp_path / f'shard{i}'}", "--shard", f"{i}/3")
        assert res.exit_code == 0, res.output
        for run in (tmp_path / f"shard{i}" / "synthetic").iterdir():
            s = json.loads((run / "summary.json").read_text())
            seen.append((s["entry"], s["seed"]))
    assert sorted(seen) == sorted((e, s) for e in ("sgd-small", "adabatch") for s in (0, 1))
    dirs = ",".join(str(tmp_path / f"shard{i}") for i in (1, 2, 3))
    res = run_cli("report", f"results_dir={dirs}", f"out={tmp_path / 'merged'}")
    assert res.exit_code == 0, res.output
    line = next(x for x in res.output.splitlines() if x.startswith("adabatch"))
    assert line.split()[1] == "2"  # both seeds, from different shard folders
    res = run_cli("run", *common, f"results_dir={tmp_path / 'x'}", "--shard", "4/3")
    assert res.exit_code == 2 and "--shard must be i/n with 1 <= i <= n" in res.output


def test_report_wandb_offline_says_what_to_sync(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "home" / ".config" / "wandb"))
    res = run_cli("run", "suite=synthetic", "policy=sgd-small", "seeds=0", "epochs=1", "n_samples=600",
                  f"results_dir={tmp_path / 'r'}", "wandb=offline", "-q")
    assert res.exit_code == 0, res.output
    res = run_cli("report", f"results_dir={tmp_path / 'r'}", "--wandb")
    assert res.exit_code == 2
    last = res.output.strip().splitlines()[-1]
    assert "W&B online" in last and "wandb sync" in last


def test_resumed_run_continues_the_same_wandb_run(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "home" / ".config" / "wandb"))
    args = ["run", "suite=synthetic", "policy=sgd-small", "seeds=0", "epochs=2", "n_samples=600",
            f"results_dir={tmp_path / 'r'}", "wandb=offline", "--no-report", "-q"]
    assert run_cli(*args).exit_code == 0
    (run,) = (tmp_path / "r" / "synthetic").iterdir()
    assert run_cli(*args, f"resume={run.name}").exit_code == 0
    offline = sorted((run / "wandb").glob("offline-run-*"))
    # W&B names an offline run's folder offline-run-<time>-<run id>[-k]: the same id twice
    assert len(offline) == 2 and all(f"-{run.name}" in d.name for d in offline)
    assert json.loads((run / "summary.json").read_text())["wandb"]["run_id"] == run.name
