"""Golden results: what every built-in policy did on the synthetic and MNIST-1D suites.

Each suite runs through the real ``divebench run`` (click, in this process) with a fixed
seed on the CPU, as shipped except for a short budget (``GOLDEN_RUNS``: 6 epochs of
synthetic, 8 of MNIST-1D: AdaBatch doubles once and DiveBatch's first measurement moves
its batch size; ``test_golden_runs_move_the_batch_size`` keeps it so).
Per entry, bench/golden/<suite>.json holds the epoch-by-epoch batch size, LR multiplier,
measurement flag and measured n·Δ̂, cumulative optimiser steps and samples, validation
accuracy, and the final totals. Any change fails with the list of what moved, epoch by
epoch. Regenerate deliberately (and say why in the commit)::

    pytest bench/test_golden.py --update-golden      # or: divebench bench --update-golden

On one CPU with one torch thread and deterministic algorithms a rerun reproduces every
count and accuracy exactly and n·Δ̂ to ~1e-9 (``test_rerun_reproduces_the_numbers``);
accuracies are compared to 1e-6 and n·Δ̂ to a relative 1e-6. Another CPU model or torch version may round differently:
the failure message names the environment the golden file was recorded in.
"""

from __future__ import annotations

import json
import math
import platform
import re
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
    "mnist1d": ["seeds=0", "epochs=8"],
}
COMMON = ["device=cpu", "wandb=off", "threads=1"]
PER_EPOCH = ("batch_size", "lr_multiplier", "measured", "n_grad_diversity", "step", "samples_seen", "val_acc")
TOTALS = ("status", "epochs_completed", "steps", "samples_seen", "final_batch_size", "final_val_acc")
ABS_TOL = {"val_acc": 1e-6, "final_val_acc": 1e-6, "lr_multiplier": 1e-12}
REL_TOL = {"n_grad_diversity": 1e-6}


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

    args = ["run", f"suite={suite}", *GOLDEN_RUNS[suite], *COMMON, *extra,
            f"results_dir={results_dir}", "--no-report", "-q"]
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
            "cpu": cpu_model()}


def command(suite: str) -> str:
    return "divebench run " + " ".join([f"suite={suite}", *GOLDEN_RUNS[suite], *COMMON])


def dump(obj: Any) -> str:
    """JSON with each per-epoch list on one line, so a diff of the file reads by epoch."""
    text = json.dumps(obj, indent=2)
    return re.sub(r"\[\s+([^\[\]{}]*?)\s+\]",
                  lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text) + "\n"


def _close(key: str, a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool) or not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        return bool(a == b)
    if key in REL_TOL:
        return math.isclose(a, b, rel_tol=REL_TOL[key], abs_tol=0.0)
    return abs(a - b) <= ABS_TOL.get(key, 0.0)


def diff(golden: dict[str, Any], now: dict[str, Any], entries: Sequence[str] | None = None) -> list[str]:
    """What moved, one readable line per change; empty when ``now`` matches ``golden``.
    ``entries`` limits the comparison to those entries (a partial run)."""
    out: list[str] = []
    names = list(entries) if entries is not None else sorted(set(golden) | set(now))
    for name in names:
        g, n = golden.get(name), now.get(name)
        if g is None or n is None:
            out.append(f"{name}: {'not in the golden file' if g is None else 'did not run'}")
            continue
        for key in ("policy", *TOTALS):
            if not _close(key, g.get(key), n.get(key)):
                out.append(f"{name}: {key} {g.get(key)!r} -> {n.get(key)!r}")
        for key in PER_EPOCH:
            gs, ns = g["per_epoch"].get(key, []), n["per_epoch"].get(key, [])
            moved = [i for i in range(max(len(gs), len(ns)))
                     if i >= len(gs) or i >= len(ns) or not _close(key, gs[i], ns[i])]
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
    changes = diff(golden_file["entries"], now, entries)
    if not changes:
        return None
    env, here = golden_file.get("environment", {}), environment()
    env_note = "" if env == here else f"\n(golden recorded with {env}; this run: {here})"
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
    """The golden settings exercise the policies: every entry completes, and AdaBatch's
    and DiveBatch's batch sizes change within the budget."""
    for suite, entries in records.items():
        assert set(entries) == {"sgd-small", "sgd-large", "adabatch", "divebatch"}, suite
        for name, e in entries.items():
            assert e["status"] == "complete", f"{suite} {name}: {e['status']}"
        for name in ("adabatch", "divebatch"):
            sizes = entries[name]["per_epoch"]["batch_size"]
            assert len(set(sizes)) > 1, f"{suite} {name}: the batch size never moved ({sizes})"


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
