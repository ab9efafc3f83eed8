"""Golden results: what every built-in policy did on the synthetic and MNIST-1D suites.

Each suite runs through the real ``divebench run`` (click, in this process) with a fixed
seed on the CPU, as shipped except for a short budget (``GOLDEN_RUNS``: 6 epochs of
synthetic, 8 of MNIST-1D: AdaBatch doubles once and DiveBatch's first measurement moves
its batch size; ``test_golden_runs_move_the_batch_size`` keeps it so) and ``dtype=float64``.
Per entry, bench/golden/<suite>.json holds the epoch-by-epoch batch size, LR multiplier,
measurement flag and measured n·Δ̂, cumulative optimiser steps and samples, training
and validation loss, validation accuracy, and the final totals. A change fails with the
list of what moved, epoch by epoch. Regenerate deliberately (and say why in the commit)::

    pytest bench/test_golden.py --update-golden      # or: divebench bench --update-golden

Why float64, and what is compared how (measured 2026-12-01, AMD EPYC, torch 2.14.1,
ATEN_CPU_CAPABILITY=default against avx2; the README's "Golden results" has the table):
the CPU kernels of another vector path (SSE / AVX2 / AVX-512) sum in another order.
In float32 that moved sgd-small's MNIST-1D accuracy from epoch 3 and DiveBatch's
measured n·Δ̂ by 40%, so golden files recorded on one processor failed on another. In
float64 the same difference starts near 1e-16 and, over the golden budget, stays below
1e-9 on the synthetic suite (a smooth, convex problem: every column holds to 1e-5 in
every epoch) and below 4e-7 on MNIST-1D's first 4 epochs. The MNIST-1D CNN is a ReLU
network: once a perturbation reaches ~1e-8, a pre-activation crosses zero, a gradient
jumps, and the run moves by 1e-4 to 1e-2 (sgd-small did so in epoch 6 here). So:

- discrete columns (batch size, measurement flag, LR multiplier, steps, samples, status,
  epoch count) must match exactly in every epoch: they change only when a policy, the
  loop or the sampler changes (DiveBatch's first resize uses the n·Δ̂ of epoch 4, inside
  the exact horizon);
- continuous columns (losses, accuracy, n·Δ̂) must match tightly (``TIGHT``: 1e-5
  relative, accuracy exactly) for the suite's first ``EXACT_EPOCHS`` epochs, where a
  1% change of the LR, of a statistic or of the data moves them by far more;
- after that horizon they must stay within ``LOOSE`` (5x the largest spread measured
  between dispatch levels), which still catches a run that trains differently.

``test_golden_under_dispatch_level`` reruns ``test_golden`` in a subprocess under each
vector path this processor can be capped to (``ATEN_CPU_CAPABILITY`` for ATen,
``ONEDNN_MAX_CPU_ISA`` for oneDNN, ``MKL_ENABLE_INSTRUCTIONS`` for MKL) against the same
golden files, so one machine shows that the files hold on other processors.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from divebench.results import cpu_model

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
# suite -> the settings on top of the suite's own (entries, delta, resize_freq as shipped)
GOLDEN_RUNS: dict[str, list[str]] = {
    "synthetic": ["seeds=0", "epochs=6"],
    # gns and normtest measure steps all run long: their golden trajectories are the
    # synthetic suite's (cheap), and MNIST-1D keeps the other entries (CI time)
    "mnist1d": ["seeds=0", "epochs=8", "policy=sgd-small,sgd-large,adabatch,divebatch,smith"],
}
COMMON = ["device=cpu", "wandb=off", "threads=1", "dtype=float64"]
PER_EPOCH = ("batch_size", "lr_multiplier", "measured", "measured_steps", "n_grad_diversity", "step",
             "samples_seen", "train_loss", "val_loss", "val_acc")
TOTALS = ("status", "epochs_completed", "steps", "samples_seen", "final_batch_size", "final_val_acc")
# suite -> epochs whose continuous columns are compared tightly (the rest: LOOSE)
EXACT_EPOCHS = {"synthetic": 6, "mnist1d": 4}
# (kind, bound) per continuous column; discrete columns must be equal
TIGHT = {"train_loss": ("rel", 1e-5), "val_loss": ("rel", 1e-5), "n_grad_diversity": ("rel", 1e-5),
         "val_acc": ("abs", 1e-9), "lr_multiplier": ("abs", 1e-12)}
LOOSE = {"train_loss": ("rel", 0.05), "val_loss": ("rel", 0.05), "n_grad_diversity": ("rel", 0.05),
         "val_acc": ("abs", 0.02), "lr_multiplier": ("abs", 1e-12)}
TOTAL_AS = {"final_val_acc": "val_acc"}
# Per-step rules (gns, normtest) turn each measured step's statistics into a batch size
# through ⌈·⌉: after the exact horizon the statistics move with the vector path (see
# above), and a ⌈·⌉ near an integer moves a step's batch by one and every later count
# with it. Their counting columns are compared within PER_STEP_LOOSE after the horizon
# (relative, plus an absolute slack of 2); before it, exactly like every other entry.
PER_STEP_POLICIES = ("gns", "normtest")
PER_STEP_COUNTS = ("batch_size", "step", "measured_steps", "final_batch_size", "steps")
PER_STEP_LOOSE = 0.15  # totals compared like the last epoch's column
# dispatch level -> the caps of ATen, oneDNN and MKL for it
LEVELS = {
    "default": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "avx512": {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "MKL_ENABLE_INSTRUCTIONS": "AVX512"},
}
LEVEL_ENV = "DIVEBENCH_GOLDEN_LEVEL"  # set in the subprocess of a dispatch-level rerun


@pytest.fixture(scope="module")
def reproducible() -> Iterator[None]:
    """One torch thread (a reduction split over threads rounds differently) and
    deterministic algorithms, for the module's duration."""
    threads = torch.get_num_threads()
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.set_num_threads(threads)


def run_suite(suite: str, results_dir: Path, extra: Sequence[str] = ()) -> dict[str, Any]:
    """``divebench run`` the suite's golden settings (+ ``extra``); the golden record."""
    from divebench import cli

    given = {a.split("=", 1)[0] for a in extra}
    base = [a for a in [*GOLDEN_RUNS[suite], *COMMON] if a.split("=", 1)[0] not in given]  # extra wins
    args = ["run", f"suite={suite}", *base, *extra, f"results_dir={results_dir}", "--no-report", "-q"]
    res = CliRunner().invoke(cli.main, args)
    assert res.exit_code == 0, f"divebench {' '.join(args)} exited {res.exit_code}:\n{res.output}"
    return record(results_dir, suite)


def record(results_dir: Path, suite: str) -> dict[str, Any]:
    """Per entry: the per-epoch columns of PER_EPOCH and the TOTALS of its summary."""
    from divebench.results import read_jsonl

    entries: dict[str, Any] = {}
    for run in sorted((results_dir / suite).iterdir()):
        summary = json.loads((run / "summary.json").read_text())
        rows = read_jsonl(run / "metrics.jsonl")
        assert summary["entry"] not in entries, f"two runs of {summary['entry']} in {results_dir}"
        entries[summary["entry"]] = {
            "policy": summary["policy"],
            **{k: summary.get(k) for k in TOTALS},
            "per_epoch": {k: [r.get(k) for r in rows] for k in PER_EPOCH},
        }
    return dict(sorted(entries.items()))


def environment() -> dict[str, Any]:
    return {"torch": torch.__version__, "machine": platform.machine(), "torch_threads": 1,
            "cpu": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def command(suite: str) -> str:
    return "divebench run " + " ".join([f"suite={suite}", *GOLDEN_RUNS[suite], *COMMON])


def dump(obj: Any) -> str:
    """JSON with each per-epoch list on one line, so a diff of the file reads by epoch."""
    text = json.dumps(obj, indent=2)
    return re.sub(r"\[\s+([^\[\]{}]*?)\s+\]",
                  lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text) + "\n"


def _close(key: str, a: Any, b: Any, tight: bool) -> bool:
    """Whether ``b`` matches the golden ``a``: discrete values exactly, continuous ones
    within TIGHT (inside the exact horizon) or LOOSE."""
    kind_bound = (TIGHT if tight else LOOSE).get(TOTAL_AS.get(key, key))
    if (kind_bound is None or isinstance(a, bool) or isinstance(b, bool)
            or not isinstance(a, (int, float)) or not isinstance(b, (int, float))):
        return bool(a == b)
    kind, bound = kind_bound
    if kind == "rel":
        return math.isclose(a, b, rel_tol=bound, abs_tol=0.0)
    return abs(a - b) <= bound


def _close_count(a: Any, b: Any) -> bool:
    """A per-step rule's count after the exact horizon (PER_STEP_LOOSE)."""
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        return bool(a == b)
    return abs(a - b) <= PER_STEP_LOOSE * abs(a) + 2


def diff(golden: dict[str, Any], now: dict[str, Any], entries: Sequence[str] | None = None,
         exact_epochs: int = 10**9) -> list[str]:
    """What moved, one readable line per change; empty when ``now`` matches ``golden``.
    ``entries`` limits the comparison to those entries (a partial run); continuous
    columns are compared with TIGHT in the first ``exact_epochs`` epochs, LOOSE after."""
    out: list[str] = []
    names = list(entries) if entries is not None else sorted(set(golden) | set(now))
    for name in names:
        g, n = golden.get(name), now.get(name)
        if g is None or n is None:
            out.append(f"{name}: {'not in the golden file' if g is None else 'did not run'}")
            continue
        last_tight = len(g["per_epoch"].get("val_acc", [])) <= exact_epochs
        for key in ("policy", *TOTALS):
            if g.get("policy") in PER_STEP_POLICIES and key in PER_STEP_COUNTS and not last_tight:
                if not _close_count(g.get(key), n.get(key)):
                    out.append(f"{name}: {key} {g.get(key)!r} -> {n.get(key)!r}")
            elif not _close(key, g.get(key), n.get(key), last_tight):
                out.append(f"{name}: {key} {g.get(key)!r} -> {n.get(key)!r}")
        for key in PER_EPOCH:
            gs, ns = g["per_epoch"].get(key, []), n["per_epoch"].get(key, [])
            loose_counts = g.get("policy") in PER_STEP_POLICIES and key in PER_STEP_COUNTS
            moved = [i for i in range(max(len(gs), len(ns)))
                     if i >= len(gs) or i >= len(ns)
                     or not (_close_count(gs[i], ns[i]) if loose_counts and i >= exact_epochs
                             else _close(key, gs[i], ns[i], i < exact_epochs))]
            if not moved:
                continue
            out.append(f"{name}: {key} by epoch: golden {gs} now {ns}")
            for i in moved[:5]:
                gv = gs[i] if i < len(gs) else "(no epoch)"
                nv = ns[i] if i < len(ns) else "(no epoch)"
                out.append(f"    epoch {i + 1}: {key} {gv} -> {nv}")
            if len(moved) > 5:
                out.append(f"    ... and {len(moved) - 5} more epochs")
    return out


def check(suite: str, now: dict[str, Any], golden_file: dict[str, Any], entries: Sequence[str] | None = None) -> str | None:
    """None when ``now`` matches the golden file; else the failure message."""
    changes = diff(golden_file["entries"], now, entries, EXACT_EPOCHS[suite])
    if not changes:
        return None
    env, here = golden_file.get("environment", {}), environment()
    env_note = "" if env == here else f"\n(golden recorded with {env}; this run: {here})"
    if any(k in os.environ for k in LEVELS["default"]):
        env_note += "\n(dispatch caps: " + ", ".join(f"{k}={os.environ[k]}" for k in LEVELS["default"] if k in os.environ) + ")"
    return (f"golden results of suite {suite} changed ({command(suite)}):\n  " + "\n  ".join(changes)
            + env_note + "\nIf the change is intended: pytest bench/test_golden.py --update-golden "
            "(or divebench bench --update-golden) and commit bench/golden/ with the reason.")


@pytest.fixture(scope="module")
def records(reproducible: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    return {s: run_suite(s, tmp_path_factory.mktemp(s)) for s in GOLDEN_RUNS}


@pytest.mark.parametrize("suite", sorted(GOLDEN_RUNS))
def test_golden(suite: str, records: dict[str, dict[str, Any]], update_golden: bool) -> None:
    now = records[suite]
    path = GOLDEN_DIR / f"{suite}.json"
    if update_golden:
        GOLDEN_DIR.mkdir(exist_ok=True)
        path.write_text(dump({"suite": suite, "command": command(suite), "environment": environment(),
                              "entries": now}))
        return
    assert path.exists(), f"{path} is missing: create it with pytest bench/test_golden.py --update-golden"
    message = check(suite, now, json.loads(path.read_text()))
    assert message is None, message


def test_golden_runs_move_the_batch_size(records: dict[str, dict[str, Any]]) -> None:
    """The golden settings exercise the policies: every entry completes, and every
    adaptive policy's batch size changes within the budget."""
    adaptive = {"synthetic": ("adabatch", "divebatch", "gns", "normtest"),
                "mnist1d": ("adabatch", "divebatch", "smith")}
    for suite, entries in records.items():
        assert set(entries) == {"sgd-small", "sgd-large", *adaptive[suite]}, suite
        for name, e in entries.items():
            assert e["status"] == "complete", f"{suite} {name}: {e['status']}"
        for name in adaptive[suite]:
            sizes = entries[name]["per_epoch"]["batch_size"]
            b0 = entries["sgd-small"]["per_epoch"]["batch_size"][0]
            # (a per-step rule may move it within the first epoch: then only the end shows)
            assert len(set(sizes)) > 1 or sizes[0] != b0, f"{suite} {name}: the batch size never moved ({sizes})"


def test_rerun_reproduces_the_numbers(records: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    """A second run reproduces the first, the premise of comparing to 1e-6: every count,
    batch size, flag and accuracy exactly; n·Δ̂ to 1e-7 relative, ten times inside the
    golden tolerance. n·Δ̂ is not bit-reproducible: the exact provider picks, per layer
    shape, whichever per-sample-norm strategy is fastest on this machine at that moment,
    and the float32 strategies round differently; reruns differed by 1e-10 to 1.4e-9."""
    again = run_suite("mnist1d", tmp_path, ["policy=divebatch"])["divebatch"]
    first = records["mnist1d"]["divebatch"]
    assert {k: first[k] for k in TOTALS} == {k: again[k] for k in TOTALS}
    for key in PER_EPOCH:
        a, b = first["per_epoch"][key], again["per_epoch"][key]
        if key == "n_grad_diversity":
            assert [x is None for x in a] == [x is None for x in b]
            assert all(x is None or math.isclose(x, y, rel_tol=1e-7) for x, y in zip(a, b, strict=True)), (a, b)
        else:
            assert a == b, f"{key}: {a} vs {b}"


def test_changed_delta_fails_with_a_readable_diff(records: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    """Changing the DiveBatch rule's δ is caught, and the message says which batch sizes moved."""
    golden_file = {"entries": records["synthetic"], "environment": environment()}
    from divebench import plugins
    from divebench.config import resolve

    cfg = resolve({"suite": "synthetic", "policy": "divebatch"}, plugins.get_registry())
    delta = 2 * cfg.entries[0].params["delta"]  # the suite's δ, doubled
    now = run_suite("synthetic", tmp_path, ["policy=divebatch", f"divebatch.delta={delta}"])
    message = check("synthetic", now, golden_file, entries=["divebatch"])
    assert message is not None, "a different delta went unnoticed"
    assert "divebatch: batch_size by epoch: golden" in message
    assert re.search(r"epoch \d+: batch_size \d+ -> \d+", message), message
    assert "divebatch: steps" in message and "--update-golden" in message


def test_changed_rule_fails(records: dict[str, dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A one-word change to the DiveBatch rule (max -> min) fails the golden check."""
    from divebench.policies import divebatch

    def broken_rule(batch_size: int, n_diversity: float, delta: float, b_max: int) -> int:
        if not math.isfinite(n_diversity):
            return b_max
        return int(min(min(delta * n_diversity, batch_size), b_max))

    monkeypatch.setattr(divebatch, "divebatch_rule", broken_rule)
    now = run_suite("mnist1d", tmp_path, ["policy=divebatch"])
    message = check("mnist1d", now, {"entries": records["mnist1d"]}, entries=["divebatch"])
    assert message is not None, "a changed DiveBatch rule went unnoticed"
    assert "divebatch: batch_size by epoch" in message, message


def test_changed_lr_fails(records: dict[str, dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop's LR 0.1% off (a one-line change to the schedule it applies) fails the
    golden check on both suites, within the tight horizon."""
    from divebench import engine

    schedule = engine.lr_schedule
    monkeypatch.setattr(engine, "lr_schedule", lambda v: (lambda e: 1.001 * schedule(v)(e)))
    for suite in GOLDEN_RUNS:
        now = run_suite(suite, tmp_path / suite, ["policy=sgd-small"])
        message = check(suite, now, {"entries": records[suite]}, entries=["sgd-small"])
        assert message is not None, f"{suite}: a 0.1% LR change went unnoticed"
        assert re.search(r"epoch 1: train_loss", message), message


def test_tolerance_tiers() -> None:
    """Inside the exact horizon an accuracy moved by one sample fails; after it, a move
    within LOOSE passes and one beyond it fails; discrete columns are exact everywhere."""
    def rec(acc: list[float], steps: list[int]) -> dict[str, Any]:
        return {"e": {"policy": "sgd", "status": "complete", "epochs_completed": len(acc), "steps": steps[-1],
                      "samples_seen": 0, "final_batch_size": 32, "final_val_acc": acc[-1],
                      "per_epoch": {"val_acc": acc, "step": steps}}}

    golden = rec([0.5, 0.6, 0.7], [10, 20, 30])
    assert diff(golden, rec([0.5, 0.6, 0.7], [10, 20, 30]), exact_epochs=2) == []
    assert diff(golden, rec([0.5, 0.601, 0.7], [10, 20, 30]), exact_epochs=2) != []
    assert diff(golden, rec([0.5, 0.6, 0.71], [10, 20, 30]), exact_epochs=2) == []
    assert diff(golden, rec([0.5, 0.6, 0.75], [10, 20, 30]), exact_epochs=2) != []
    assert diff(golden, rec([0.5, 0.6, 0.7], [10, 20, 31]), exact_epochs=2) != []
    # a per-step rule's counts: exact inside the horizon, within PER_STEP_LOOSE after it
    golden["e"]["policy"] = "gns"
    def gns(steps: list[int]) -> dict[str, Any]:
        return {"e": {**rec([0.5, 0.6, 0.7], steps)["e"], "policy": "gns"}}
    assert diff(golden, gns([10, 20, 31]), exact_epochs=2) == []
    assert diff(golden, gns([10, 20, 40]), exact_epochs=2) != []
    assert diff(golden, gns([10, 21, 30]), exact_epochs=2) != []


# the CPU flags each ATen level needs (torch does not check: capped above the
# processor's own level, it runs instructions the processor lacks and dies of SIGILL)
LEVEL_FLAGS = {"default": set(), "avx2": {"avx2", "fma"}, "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq"}}
LEVEL_NAME = {"default": "DEFAULT", "avx2": "AVX2", "avx512": "AVX512"}  # get_cpu_capability()


def _cpu_flags() -> set[str] | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return None


def _level_skip_reason(level: str) -> str | None:
    """Why ``level`` cannot or need not be rerun here (None: rerun it)."""
    if os.environ.get(LEVEL_ENV):
        return "already inside a dispatch-level rerun"
    flags = _cpu_flags()
    if flags is None:
        return "no /proc/cpuinfo: cannot tell which vector paths this CPU has"
    if not LEVEL_FLAGS[level] <= flags:
        return f"this CPU lacks {', '.join(sorted(LEVEL_FLAGS[level] - flags))} for the {level} path"
    if torch.backends.cpu.get_cpu_capability() == LEVEL_NAME[level]:
        return f"{level} is the path this process runs: test_golden covers it"
    return None


@pytest.fixture(scope="module", autouse=True)
def level_runs(update_golden: bool) -> Iterator[dict[str, subprocess.Popen[str]]]:
    """test_golden rerun in one fresh process per dispatch level to check, all started
    when this module starts (each uses one thread: they run beside the in-process checks,
    and the dispatch-level tests at the end collect them)."""
    procs: dict[str, subprocess.Popen[str]] = {}
    if not update_golden:
        cmd = [sys.executable, "-m", "pytest", f"{Path(__file__)}::test_golden", "-q", "-p", "no:cacheprovider",
               "-p", "no:randomly", "-p", "no:xdist", "--benchmark-disable"]
        for level in LEVELS:
            if _level_skip_reason(level) is None:
                procs[level] = subprocess.Popen(
                    cmd, env=os.environ | LEVELS[level] | {LEVEL_ENV: level}, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent)
    try:
        yield procs
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


@pytest.mark.slow
@pytest.mark.parametrize("level", list(LEVELS))
def test_golden_under_dispatch_level(level: str, update_golden: bool,
                                     level_runs: dict[str, subprocess.Popen[str]]) -> None:
    """test_golden, rerun in a fresh process whose ATen, oneDNN and MKL are capped at
    ``level``, passes against the same golden files. Levels this processor lacks are
    skipped; so is the level this process already runs (that is test_golden itself)."""
    if update_golden:
        pytest.skip("--update-golden writes the files; the levels compare against them")
    reason = _level_skip_reason(level)
    if reason is not None:
        pytest.skip(reason)
    out, err = level_runs[level].communicate(timeout=1800)
    last = out.strip().splitlines()[-1] if out.strip() else "(no output)"
    print(f"{level} ({', '.join(f'{k}={v}' for k, v in LEVELS[level].items())}): {last}")
    assert level_runs[level].returncode == 0, f"golden check failed under {level}:\n{out[-6000:]}\n{err[-2000:]}"
