"""The local report: Markdown + self-contained HTML + PNGs, and the console table."""

from __future__ import annotations

import base64
import json
import re

import matplotlib.image as mpimg
import pytest
from fakeruns import make_run

from divebench.report import format_table, write_report
from divebench.scoring import load_runs, score_suite


def _suite(root, target=0.94, grad_div=True):
    for seed, sign in ((1, 1), (2, -1)):
        make_run(
            root,
            "cifar10",
            "sgd-128",
            seed,
            [0.5, 0.8, 0.9, 0.946, 0.955],
            [797.2 + sign, 797.2, 797.2, 797.2 - sign, 500.0],
            batch_sizes=128,
            n_train=50_000,
            baseline="sgd-128",
            target_accuracy=target,
        )
        make_run(
            root,
            "cifar10",
            "divebatch",
            seed,
            [0.6, 0.93, 0.935, 0.9382],
            [319.1, 319.1 + sign, 200.0, 200.0],
            batch_sizes=[128, 512, 2048, 2048],
            n_train=50_000,
            baseline="sgd-128",
            target_accuracy=target,
            stamp="20250101T010000",
            n_grad_diversity=[5000.0 + 100 * sign, None, None, None] if grad_div else None,
        )


def test_report_files_tables_and_charts(tmp_path):
    _suite(tmp_path / "results")
    make_run(tmp_path / "results", "cifar10", "divebatch", 3, [0.5], status="failed")
    md = write_report([tmp_path / "results"], tmp_path / "out")
    assert md == tmp_path / "out" / "report.md"
    text = md.read_text()
    # sgd-128: 4 × 797.2 = 3188.8 s; divebatch: 2 × 319.1 = 638.2 s -> the paper's 5.00×
    assert "3,188.8" in text and "638.2" in text and "5.00×" in text
    assert "miss (0/2 hit)" in text  # divebatch never reaches 94 %
    assert "| divebatch | divebatch | 2 |" in text  # the failed seed is not averaged in ...
    assert re.search(r"divebatch-s3-\S+ \| divebatch \| 3 \| failed", text)  # ... but listed
    pngs = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert pngs == sorted(
        f"cifar10-{s}.png"
        for s in (
            "val_acc-vs-time",
            "val_acc-vs-samples",
            "batch_size-vs-epoch",
            "grad_diversity-vs-epoch",
            "pareto",
            "lr-vs-epoch",
        )
    )
    for name in pngs:
        assert f"]({name})" in text  # linked from the Markdown, relative to it
        img = mpimg.imread(tmp_path / "out" / name)
        assert img.shape[0] > 300 and img.shape[1] > 500
    scores = json.loads((tmp_path / "out" / "scores.json").read_text())
    dive = next(e for e in scores["cifar10"]["entries"] if e["entry"] == "divebatch")
    assert dive["speedups"]["paper_time"] == pytest.approx(3188.8 / 638.2)
    assert dive["target"]["time_s"]["mean"] == "inf"


def test_html_is_self_contained(tmp_path):
    _suite(tmp_path / "results")
    write_report([tmp_path / "results"], tmp_path / "out")
    page = (tmp_path / "out" / "report.html").read_text()
    srcs = re.findall(r"src='([^']*)'", page)
    assert len(srcs) == 6  # five line charts and the Pareto chart
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<table>" in page and "5.00×" in page
    assert "href=" not in page and "<link" not in page


def test_no_grad_diversity_chart_when_nothing_was_measured(tmp_path):
    _suite(tmp_path / "results", target=0.0, grad_div=False)
    md = write_report([tmp_path / "results"], tmp_path / "out")
    assert not (tmp_path / "out" / "cifar10-grad_diversity-vs-epoch.png").exists()
    text = md.read_text()
    assert "No entry measured gradient diversity" in text
    assert "fixed target" in text and "Time to the fixed target" not in text


def test_console_table(tmp_path):
    _suite(tmp_path)
    make_run(
        tmp_path,
        "cifar10",
        "divebatch",
        7,
        [0.7, 0.1],
        status="diverged",
        baseline="sgd-128",
        target_accuracy=0.94,
    )
    table = format_table(score_suite(load_runs([tmp_path])))
    lines = table.splitlines()
    assert lines[0] == "suite cifar10 — speed-ups vs sgd-128"
    assert lines[1].split()[:4] == ["entry", "seeds", "final", "acc"]
    assert "time to 94% s" in lines[1]
    dive = next(line for line in lines if line.startswith("divebatch"))
    assert "5.00×" in dive and "miss (0/3 hit)" in dive and "(+1 div)" in dive
    assert "-1.68" in dive  # 93.82 - 95.50 percentage points
    assert any("diverged 1/3" in line for line in lines)
    sgd = next(line for line in lines if line.startswith("sgd-128"))
    assert "95.50 ± 0.00" in sgd and "1.00×" in sgd


def test_one_seed_shows_an_undefined_error(tmp_path):
    make_run(tmp_path, "s", "a", 0, [0.5, 0.7])
    table = format_table(score_suite(load_runs([tmp_path])))
    assert "70.00 ± –" in table


def test_several_suites_and_shards_and_empty(tmp_path):
    make_run(tmp_path / "shard1", "synthetic", "sgd", 0, [0.5, 0.7])
    make_run(tmp_path / "shard2", "synthetic", "sgd", 1, [0.5, 0.9])
    make_run(tmp_path / "shard2", "mnist1d", "adabatch", 0, [0.4, 0.6], batch_sizes=[32, 64])
    md = write_report([tmp_path / "shard1", tmp_path / "shard2"], tmp_path / "out")
    text = md.read_text()
    assert "## Suite mnist1d" in text and "## Suite synthetic" in text
    assert "80.00 ± 10.00" in text  # both shards' seeds of synthetic/sgd merged
    only = write_report([tmp_path / "shard2"], tmp_path / "out2", suite="mnist1d").read_text()
    assert "## Suite mnist1d" in only and "synthetic" not in only.split("## Suite mnist1d")[1]
    empty = write_report([tmp_path / "nothing"], tmp_path / "out3").read_text()
    assert "No run folders found" in empty
