"""Scores from hand-made run folders: the paper metric, fixed targets, seeds, speed-ups."""

from __future__ import annotations

import json
import math

import pytest
from fakeruns import make_run

from divebench import scoring
from divebench.scoring import (
    fmt_pct,
    fmt_speedup,
    fmt_target,
    load_runs,
    mean_se,
    score_suite,
    speedup,
)

# Seed-mean accuracy curves shaped like the paper's CIFAR-10 runs (fractions).
SGD_CURVE = [0.50, 0.70, 0.85, 0.90, 0.94, 0.946, 0.95, 0.952, 0.954, 0.955]
DIVE_CURVE = [0.60, 0.80, 0.90, 0.93, 0.935, 0.936, 0.937, 0.9382]
# Seed-mean per-epoch training times: SGD-128 sums to 3188.8 s by its ±1 % epoch (6),
# DiveBatch to 638.2 s by its ±1 % epoch (4): the paper's published CIFAR-10 times.
SGD_TIMES = [530.0, 531.0, 532.0, 531.0, 532.0, 532.8, 530.0, 530.0, 530.0, 530.0]
DIVE_TIMES = [160.0, 160.0, 159.1, 159.1, 100.0, 100.0, 100.0, 100.0]


def _paper_suite(tmp_path, target=0.0):
    """Two seeds per entry, spread symmetrically around the seed-mean curves above."""
    for seed, sign in ((1, +1), (2, -1)):
        make_run(
            tmp_path,
            "cifar10",
            "sgd-128",
            seed,
            [a + sign * 0.002 for a in SGD_CURVE],
            [t + sign * 5.0 for t in SGD_TIMES],
            batch_sizes=128,
            n_train=50_000,
            baseline="sgd-128",
            target_accuracy=target,
            stamp="20250101T000000",
        )
        make_run(
            tmp_path,
            "cifar10",
            "divebatch",
            seed,
            [a + sign * 0.001 for a in DIVE_CURVE],
            [t + sign * 2.0 for t in DIVE_TIMES],
            batch_sizes=[128, 128, 512, 512, 2048, 2048, 2048, 2048],
            n_train=50_000,
            baseline="sgd-128",
            target_accuracy=target,
            stamp="20250101T010000",
        )
    return load_runs([tmp_path])


def test_paper_metric_reproduces_published_cifar10_speedup(tmp_path):
    score = score_suite(_paper_suite(tmp_path), baseline=None, target_accuracy=None)
    assert score.baseline == "sgd-128"  # read from the runs' configs
    sgd, dive = score.entry("sgd-128"), score.entry("divebatch")
    assert sgd.paper.final_acc == pytest.approx(0.955)
    assert sgd.paper.epoch == 6
    assert sgd.paper.time_s == pytest.approx(3188.8)
    assert dive.paper.epoch == 4
    assert dive.paper.time_s == pytest.approx(638.2)
    assert dive.speedups["paper_time"] == pytest.approx(3188.8 / 638.2)
    assert fmt_speedup(dive.speedups["paper_time"]) == "5.00×"
    assert fmt_speedup(sgd.speedups["paper_time"]) == "1.00×"
    # steps and samples at the convergence epoch: seed means of the cumulative counters
    assert sgd.paper.steps == 6 * math.ceil(50_000 / 128)
    assert dive.paper.steps == 2 * math.ceil(50_000 / 128) + 2 * math.ceil(50_000 / 512)
    assert dive.paper.samples == 4 * 50_000
    assert dive.speedups["paper_samples"] == pytest.approx(6 / 4)
    # accuracy difference in percentage points: 93.82 - 95.50
    assert dive.acc_diff_pp == pytest.approx(93.82 - 95.50)
    assert dive.final_acc.n == 2


def test_convergence_epoch_includes_exact_final_minus_one_point(tmp_path):
    # mean at epoch 2 is exactly final - 0.01 (0.80 = 0.81 - 0.01): it counts
    make_run(tmp_path, "s", "a", 0, [0.5, 0.80, 0.805, 0.81], epoch_time_s=[1.0, 2.0, 3.0, 4.0])
    e = score_suite(load_runs([tmp_path])).entry("a")
    assert e.paper.epoch == 2
    assert e.paper.time_s == pytest.approx(3.0)


def test_fixed_target_miss_is_reported_as_miss_not_a_number(tmp_path):
    score = score_suite(_paper_suite(tmp_path, target=0.95))
    sgd, dive = score.entry("sgd-128"), score.entry("divebatch")
    assert score.target_accuracy == 0.95
    # seed 1 reaches 0.95 at epoch 6 (0.948 < 0.95 -> epoch 7: 0.952), seed 2 at epoch 8 (0.950)
    assert sgd.target.hits == 2
    assert sgd.target.per_seed_time_s[1] == pytest.approx(sum(t + 5 for t in SGD_TIMES[:7]))
    assert sgd.target.per_seed_time_s[2] == pytest.approx(sum(t - 5 for t in SGD_TIMES[:8]))
    assert math.isfinite(sgd.target.time_s.mean) and sgd.target.time_s.se > 0
    assert dive.target.hits == 0 and math.isinf(dive.target.time_s.mean)
    assert fmt_target(dive.target) == "miss (0/2 hit)"
    assert dive.speedups["target_time"] == 0.0
    assert fmt_speedup(dive.speedups["target_time"]) == "miss"
    # the paper metric still has numbers: each method against its own plateau
    assert fmt_speedup(dive.speedups["paper_time"]) == "5.00×"


def test_one_seed_missing_makes_the_target_a_miss(tmp_path):
    make_run(tmp_path, "s", "a", 0, [0.5, 0.9], target_accuracy=0.85)
    make_run(tmp_path, "s", "a", 1, [0.5, 0.8], target_accuracy=0.85)
    e = score_suite(load_runs([tmp_path])).entry("a")
    assert (e.target.hits, e.target.n) == (1, 2)
    assert math.isinf(e.target.time_s.mean)
    assert fmt_target(e.target) == "miss (1/2 hit)"


def test_speedup_edge_cases():
    assert speedup(10.0, 5.0) == 2.0
    assert speedup(10.0, math.inf) == 0.0
    assert speedup(math.inf, 5.0) == math.inf
    assert speedup(math.inf, math.inf) is None
    assert speedup(None, 1.0) is None
    assert [fmt_speedup(x) for x in (2.0, 0.0, math.inf, None)] == ["2.00×", "miss", "∞", "–"]


def test_standard_error_over_seeds(tmp_path):
    for seed, final in enumerate([0.90, 0.92, 0.94]):
        make_run(tmp_path, "s", "a", seed, [0.5, final])
    make_run(tmp_path, "s", "b", 0, [0.5, 0.91])
    score = score_suite(load_runs([tmp_path]))
    a, b = score.entry("a"), score.entry("b")
    assert a.final_acc.mean == pytest.approx(0.92)
    assert a.final_acc.se == pytest.approx(0.02 / math.sqrt(3))
    assert a.seeds == [0, 1, 2]
    assert b.final_acc.se is None
    assert fmt_pct(a.final_acc) == "92.00 ± 1.15"
    assert fmt_pct(b.final_acc) == "91.00 ± –"
    assert mean_se([]) is None
    assert mean_se([1.0, math.inf]).mean == math.inf


def test_paper_metric_averages_curves_across_seeds_before_thresholding(tmp_path):
    # seed 0 plateaus at epoch 2, seed 1 at epoch 3: the mean curve decides, not each seed
    make_run(tmp_path, "s", "a", 0, [0.5, 0.9, 0.9, 0.9], epoch_time_s=2.0)
    make_run(tmp_path, "s", "a", 1, [0.5, 0.6, 0.9, 0.9], epoch_time_s=4.0)
    e = score_suite(load_runs([tmp_path])).entry("a")
    # means: 0.5, 0.75, 0.9, 0.9 -> final 0.9, threshold 0.89 -> epoch 3
    assert e.paper.epoch == 3
    assert e.paper.time_s == pytest.approx(3 * 3.0)


def test_diverged_runs_are_flagged_and_miss_the_target(tmp_path):
    make_run(tmp_path, "s", "a", 0, [0.5, 0.9], target_accuracy=0.6)
    make_run(tmp_path, "s", "a", 1, [0.5, 0.92], target_accuracy=0.6)
    make_run(tmp_path, "s", "a", 2, [0.7, 0.1], status="diverged", target_accuracy=0.6)
    e = score_suite(load_runs([tmp_path])).entry("a")
    assert e.seeds == [0, 1] and e.n_diverged == 1 and e.diverged_seeds == [2]
    assert any("diverged 1/3" in f for f in e.flags)
    assert e.final_acc.mean == pytest.approx(0.91)  # the diverged run is not averaged in
    # it reached 0.7 >= 0.6 before diverging, and still counts as a miss
    assert (e.target.hits, e.target.n) == (2, 3)
    assert math.isinf(e.target.per_seed_time_s[2])


def test_damaged_folders_are_reported_not_fatal(tmp_path):
    good = make_run(tmp_path, "s", "a", 0, [0.5, 0.6, 0.7])
    corrupt = make_run(tmp_path, "s", "a", 1, [0.5, 0.6, 0.7])
    with open(corrupt / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 4, "val_ac')  # a line cut by a crash
    make_run(tmp_path, "s", "a", 2, [0.5], summary=False)  # killed before its summary
    (tmp_path / "s" / "junk").mkdir()
    (tmp_path / "s" / "junk" / "summary.json").write_text("{not json")
    runs = load_runs([tmp_path])
    by_name = {r.path.name: r for r in runs}
    assert len(runs) == 4
    assert by_name[corrupt.name].status == "complete"
    assert len(by_name[corrupt.name].rows) == 3
    assert any("line 4" in p for p in by_name[corrupt.name].problems)
    assert by_name["junk"].status == "unreadable"
    killed = next(r for r in runs if r.seed == 2)
    assert killed.status == "incomplete" and any("no summary.json" in p for p in killed.problems)
    score = score_suite(runs)
    assert score.entry("a").seeds == [0, 1]
    assert sorted(r.status for r in score.not_scored) == ["incomplete", "unreadable"]
    assert good.exists()


def test_shards_in_separate_results_dirs_merge_and_reruns_supersede(tmp_path):
    d1, d2 = tmp_path / "shard1", tmp_path / "shard2"
    make_run(d1, "s", "a", 0, [0.5, 0.8])
    make_run(d2, "s", "a", 1, [0.5, 0.9])
    make_run(d2, "s", "a", 0, [0.5, 0.7], status="failed", stamp="20250102T000000")
    make_run(d2, "s", "a", 1, [0.5, 0.6], stamp="20250103T000000")  # newer rerun of seed 1
    runs = load_runs([d1, d2, d1])  # d1 twice: read once
    assert len(runs) == 4
    score = score_suite(runs)
    e = score.entry("a")
    assert e.seeds == [0, 1]
    assert e.final_acc.mean == pytest.approx((0.8 + 0.6) / 2)
    assert any("superseded" in p for p in score.problems)
    assert sorted(r.status for r in score.not_scored) == ["complete", "failed"]


def test_non_finite_values_written_as_strings_are_read_back(tmp_path):
    path = make_run(tmp_path, "s", "a", 0, [0.5, 0.6])
    rows = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
    rows[1]["train_loss"] = "nan"
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run,) = load_runs([tmp_path])
    assert math.isnan(run.rows[1]["train_loss"])


def test_suite_filter_entry_order_and_missing_baseline(tmp_path):
    make_run(tmp_path, "s", "zeta", 0, [0.5, 0.6], stamp="20250101T000000")
    make_run(tmp_path, "s", "alpha", 0, [0.5, 0.7], stamp="20250101T000100")
    make_run(tmp_path, "other", "x", 0, [0.5, 0.7])
    runs = load_runs([tmp_path], suite="s")
    assert {r.suite for r in runs} == {"s"}
    score = score_suite(runs, baseline="nope", target_accuracy=None)
    assert [e.entry for e in score.entries] == ["zeta", "alpha"]  # the order the runs started
    assert any("baseline 'nope'" in p for p in score.problems)
    assert all(not e.speedups for e in score.entries)
    assert set(scoring.score_all(load_runs([tmp_path]))) == {"other", "s"}


def test_scores_serialise_to_json_with_infinities_as_strings(tmp_path):
    score = score_suite(_paper_suite(tmp_path, target=0.99))
    d = score.to_dict()
    text = json.dumps(d, allow_nan=False)  # valid JSON, no bare Infinity
    assert '"inf"' in text
    assert d["entries"][0]["entry"] == "sgd-128"


def test_epoch_times_fall_back_to_differences_of_the_cumulative_time(tmp_path):
    path = make_run(tmp_path, "s", "a", 0, [0.5, 0.9, 0.9], epoch_time_s=[1.0, 2.0, 4.0])
    rows = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        del r["epoch_train_time_s"]  # an older or foreign writer
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    e = score_suite(load_runs([tmp_path])).entry("a")
    assert e.paper.epoch == 2 and e.paper.time_s == pytest.approx(3.0)
