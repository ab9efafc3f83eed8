"""The W&B sink with the real wandb package, offline (nothing leaves the machine).

The online fallback test points W&B at a closed local port (127.0.0.1:9), so the real
``wandb.init`` fails the way it does without a network, quickly.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from divebench.report import wandb_sink
from divebench.report.wandb_sink import WandbSink, logged_in, resolve_mode

ROWS = [
    {
        "epoch": e,
        "step": 10 * e,
        "samples_seen": 320 * e,
        "batch_size": 32,
        "lr": 0.1,
        "lr_multiplier": 1.0,
        "train_loss": 1.0 / e,
        "train_acc": 0.5,
        "val_loss": 1.0 / e,
        "val_acc": 0.5 + 0.1 * e + 0.0125,
        "train_time_s": 1.5 * e,
        "epoch_train_time_s": 1.5,
        "eval_time_s": 0.1 * e,
        "other_time_s": 0.0,
        "wall_time_s": 1.6 * e,
        "measured": e == 2,
        "grad_diversity": 0.25 if e == 2 else None,
        "n_grad_diversity": 80.0 if e == 2 else None,
        "stats_time_s": 0.01 if e == 2 else 0.0,
        "peak_memory_mb": 12.5,
    }
    for e in (1, 2, 3)
]
SUMMARY = {
    "run_id": "sgd-s0-x",
    "status": "complete",
    "final_val_acc": 0.8125,
    "best_val_acc": 0.8125,
    "train_time_s": 4.5,
    "error": None,
    "wandb": None,
}


@pytest.fixture(autouse=True)
def offline_wandb(monkeypatch, tmp_path):
    """No credentials, no network, quiet; the sink's per-process memory reset."""
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_SWEEP_ID", "WANDB_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setattr(wandb_sink, "_warned", set())
    monkeypatch.setattr(wandb_sink, "_online_failed", False)


def _start(sink: WandbSink, run_dir: Path, mode: str = "offline", run_id: str = "sgd-s0-x") -> None:
    sink.start(
        run_dir,
        config={"suite": "synthetic", "entry": "sgd", "seed": 0},
        env={"torch": "2.14.1"},
        mode=mode,
        project="divebench-test",
        group="synthetic",
        job_type="sgd",
        name="sgd seed 0",
        run_id=run_id,
    )


def _run_file(run_dir: Path, run_id: str) -> Path:
    (path,) = (run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    return path


def _run_bytes(path: Path, needle: bytes, timeout_s: float = 20.0) -> bytes:
    """The run file once W&B's service has flushed it: run.finish() returns before the
    service writes an offline run's records (seen with wandb 0.31), so wait for them."""
    deadline = time.monotonic() + timeout_s
    while True:
        data = path.read_bytes()
        if needle in data or time.monotonic() > deadline:
            return data
        time.sleep(0.05)


def test_offline_run_lives_in_the_run_folder(tmp_path, capsys):
    run_dir = tmp_path / "results" / "synthetic" / "sgd-s0-x"
    run_dir.mkdir(parents=True)
    sink = WandbSink()
    _start(sink, run_dir)
    for row in ROWS:
        sink.log_epoch(row)
    info = sink.finish(SUMMARY)
    assert info["mode"] == "offline" and info["run_id"] == "sgd-s0-x"
    assert info["dir"] == str(run_dir / "wandb")
    assert info["error"] is None
    data = _run_bytes(_run_file(run_dir, "sgd-s0-x"), b"final_val_acc")
    assert info["sync_command"] == f"wandb sync {_run_file(run_dir, 'sgd-s0-x').parent}"
    # the rows, the time/sample copies, the config and the summary are in the run's record
    for needle in (
        b"val_acc",
        b"by_time/val_acc",
        b"by_samples/val_acc",
        b"n_grad_diversity",
        b"train_time_s",
        b"0.8125",
        b"divebench-test",
        b"synthetic",
        b"final_val_acc",
    ):
        assert needle in data, needle
    assert "divebench: W&B" not in capsys.readouterr().err
    assert sink.finish(SUMMARY) == info  # a second finish is harmless


def test_resume_continues_the_same_wandb_run(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for rows in (ROWS[:2], ROWS[2:]):
        sink = WandbSink()
        _start(sink, run_dir, run_id="resumable")
        for row in rows:
            sink.log_epoch(row)
        assert sink.finish(SUMMARY)["run_id"] == "resumable"
    assert len(list((run_dir / "wandb").glob("offline-run-*-resumable"))) >= 1


def test_auto_mode_is_decided_from_local_credentials(tmp_path, monkeypatch):
    assert not logged_in()
    assert resolve_mode("auto") == "offline"
    import wandb

    host = urlsplit(wandb.Settings().base_url).hostname
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine {host}\n  login user\n  password {'a' * 40}\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    assert logged_in() and resolve_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolve_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode("auto") == "off"
    assert resolve_mode("online") == "online"
    with pytest.raises(ValueError, match="wandb='sometimes' is not valid"):
        resolve_mode("sometimes")


def test_off_does_nothing(tmp_path):
    sink = WandbSink()
    _start(sink, tmp_path, mode="off")
    sink.log_epoch(ROWS[0])
    assert sink.finish(SUMMARY) is None
    assert not (tmp_path / "wandb").exists()


def test_unwritable_wandb_dir_warns_once_and_the_run_goes_on(tmp_path, capsys):
    (tmp_path / "wandb").write_text("a file where the W&B folder should be")
    sink = WandbSink()
    _start(sink, tmp_path)
    for row in ROWS:
        sink.log_epoch(row)  # no exception
    info = sink.finish(SUMMARY)
    err = capsys.readouterr().err
    assert err.count("divebench: W&B:") == 1
    assert "the run folder keeps every record" in err
    assert info["error"] and info["sync_command"] is None
    # a second run with the same problem does not repeat the same line
    sink2 = WandbSink()
    _start(sink2, tmp_path)
    sink2.finish(SUMMARY)
    assert "divebench: W&B:" not in capsys.readouterr().err


def test_missing_wandb_package(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    sink = WandbSink()
    _start(sink, tmp_path)
    sink.log_epoch(ROWS[0])
    info = sink.finish(SUMMARY)
    assert "cannot be imported" in info["error"]
    assert capsys.readouterr().err.count("divebench: W&B:") == 1


def test_a_log_call_that_raises_switches_the_sink_off(tmp_path, capsys):
    sink = WandbSink()
    _start(sink, tmp_path)
    sink.log_epoch(ROWS[0])
    sink.run.finish()  # the W&B run ends under the sink: wandb raises on the next log
    sink.log_epoch(ROWS[1])
    sink.log_epoch(ROWS[2])
    info = sink.finish(SUMMARY)
    err = capsys.readouterr().err
    assert err.count("divebench: W&B:") == 1 and "log failed" in err
    assert info["sync_command"].startswith("wandb sync ")  # what was written stays syncable
    assert _run_file(tmp_path, "sgd-s0-x").exists()


def test_online_failure_falls_back_to_offline(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_API_KEY", "a" * 40)
    sink = WandbSink(init_timeout_s=2.0, settings={"base_url": "http://127.0.0.1:9"})
    _start(sink, tmp_path, mode="auto", run_id="fallback")
    sink.log_epoch(ROWS[0])
    info = sink.finish(SUMMARY)
    err = capsys.readouterr().err
    assert "online init failed" in err and err.count("divebench: W&B:") == 1
    assert info["mode"] == "offline" and info["error"] is None
    assert _run_file(tmp_path, "fallback").exists()
    assert resolve_mode("auto") == "offline"  # later runs of this process skip the wait


# ----------------------------------------------------------------------------- W&B report


def test_report_spec_is_built_without_the_network():
    import wandb_workspaces.reports.v2 as wr

    from divebench.report.wandb_report import build_report_spec

    report = build_report_spec("mnist1d", ["sgd", "divebatch"], "divebench", None)
    assert isinstance(report, wr.Report) and report.title == "divebench: mnist1d"
    (grid,) = [b for b in report.blocks if isinstance(b, wr.PanelGrid)]
    (runset,) = grid.runsets
    assert runset.groupby == ["config.entry"]
    assert (
        "Group" in runset.filters
        and "'mnist1d'" in runset.filters
        and "divebatch" in runset.filters
    )
    axes = {(p.x, p.y[0]) for p in grid.panels}
    assert axes == {
        ("epoch", "val_acc"),
        ("train_time_s", "val_acc"),
        ("samples_seen", "val_acc"),
        ("epoch", "batch_size"),
        ("epoch", "n_grad_diversity"),
        ("epoch", "lr"),
    }
    cells = {(p.layout.x, p.layout.y) for p in grid.panels}
    assert len(cells) == len(grid.panels)  # no two panels on top of each other
    # the spec W&B would receive (no entity: no project lookup, so no network)
    spec = json.loads(report._to_model().spec.model_dump_json(by_alias=True, exclude_none=True))
    text = json.dumps(spec)
    assert '"xAxis": "train_time_s"' in text and '"xAxis": "samples_seen"' in text
    assert '"groupArea": "minmax"' in text and '"value": "mnist1d"' in text
    assert '"name": "entry.value"' in text


def test_publish_report_offline_says_what_to_do(tmp_path, monkeypatch):
    from fakeruns import make_run

    from divebench.report.wandb_report import ReportError, publish_report, sync_commands
    from divebench.scoring import load_runs

    for seed in (0, 1):
        path = make_run(tmp_path, "mnist1d", "sgd", seed, [0.5, 0.6])
        summary = json.loads((path / "summary.json").read_text())
        sync_dir = path / "wandb" / f"offline-run-20250101_000000-{summary['run_id']}"
        sync_dir.mkdir(parents=True)
        summary["wandb"] = {
            "mode": "offline",
            "dir": str(path / "wandb"),
            "run_id": summary["run_id"],
            "sync_dir": str(sync_dir),
            "sync_command": f"wandb sync {sync_dir}",
        }
        (path / "summary.json").write_text(json.dumps(summary))
    runs = load_runs([tmp_path])
    assert len(sync_commands(runs)) == 2
    with pytest.raises(ReportError, match=r"wandb login.*upload the offline runs: wandb sync "):
        publish_report("mnist1d", ["sgd"], "divebench", runs=runs)
    # once uploaded (wandb sync leaves a marker), a run no longer needs syncing
    first = Path(runs[0].summary["wandb"]["sync_dir"])
    (first / f"run-{runs[0].run_id}.wandb.synced").write_text("")
    assert len(sync_commands(runs)) == 1
    monkeypatch.setenv("WANDB_API_KEY", "a" * 40)  # logged in: still refuses, names the run
    with pytest.raises(ReportError, match=r"1 run\(s\) of mnist1d were logged offline"):
        publish_report("mnist1d", ["sgd"], "divebench", runs=runs)
