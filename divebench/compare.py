"""Regression check between two result sets of the same suite, for users' own CI.

``divebench compare BASE NEW [--suite NAME] [--fail-on time:5%,acc:0.5]`` scores both
result folders (divebench.scoring) and compares every entry of BASE with the same entry
in NEW:

- ``time:X%``     the seed-mean training time of a run (``train_time_s`` at its end) grew
                  by more than X %; so did the seed-mean time to the suite's target when
                  both reached it, and NEW missing a target that BASE reached is always
                  a time regression.
- ``acc:X``       the seed-mean final validation accuracy dropped by more than X
                  percentage points.
- ``steps:X%``    optional: the seed-mean optimiser steps of a run grew by more than X %.
- ``samples:X%``  optional: the seed-mean samples seen grew by more than X %.

Whatever the criteria, an entry of BASE without a complete run in NEW, and an entry with
diverged runs in NEW that had none in BASE, are regressions. Differences in settings
(epochs, batch sizes, ...) are reported as notes: they usually explain a change.
Timings compare like with like only on the same machine; steps and samples do not
depend on the hardware.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from divebench import scoring

DEFAULT_FAIL_ON = "time:5%,acc:0.5"
# metric -> (unit of its limit, what it measures)
METRICS = {
    "time": ("%", "seed-mean training time (and time to target)"),
    "acc": ("pp", "seed-mean final validation accuracy"),
    "steps": ("%", "seed-mean optimiser steps"),
    "samples": ("%", "seed-mean samples seen"),
}
# settings whose difference between BASE and NEW is worth a note
_SETTINGS = ("dataset", "data", "model", "n_samples", "subset", "epochs", "batch_size",
             "max_batch_size", "lr", "lr_schedule", "momentum", "weight_decay", "device")


class CompareError(Exception):
    """Bad input (missing folders, no runs, malformed --fail-on): exit code 2."""


def parse_fail_on(text: str) -> dict[str, float]:
    """``"time:5%,acc:0.5"`` -> ``{"time": 5.0, "acc": 0.5}``; raises CompareError with
    one line naming what is wrong."""
    out: dict[str, float] = {}
    if not text.strip():
        raise CompareError("--fail-on is empty: give e.g. time:5%,acc:0.5")
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"([a-z_]+)\s*:\s*([0-9]*\.?[0-9]+)\s*(%|pp)?", part)
        if not m:
            raise CompareError(f"--fail-on: '{part}' is not METRIC:LIMIT (e.g. time:5% or acc:0.5)")
        key, value, unit = m.group(1), float(m.group(2)), m.group(3)
        if key not in METRICS:
            hint = scoring_suggest(key)
            raise CompareError(f"--fail-on: unknown metric '{key}'{hint} (metrics: {', '.join(METRICS)})")
        want = METRICS[key][0]
        if unit is not None and unit != want:
            example = "acc:0.5 (percentage points)" if want == "pp" else f"{key}:5%"
            raise CompareError(f"--fail-on: {key} takes a limit in {'percentage points' if want == 'pp' else 'percent'}, e.g. {example}; got '{part}'")
        if key in out:
            raise CompareError(f"--fail-on: '{key}' is given twice")
        out[key] = value
    return out


def scoring_suggest(word: str) -> str:
    import difflib

    close = difflib.get_close_matches(word, list(METRICS), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""


@dataclass
class Finding:
    """One compared number of one entry."""

    suite: str
    entry: str
    metric: str  # time, target_time, acc, steps, samples, runs
    base: float | None
    new: float | None
    change: float | None  # % for time/steps/samples, pp for acc
    limit: float | None
    regressed: bool
    text: str


@dataclass
class CompareReport:
    base_dir: Path
    new_dir: Path
    suites: list[str]
    fail_on: dict[str, float]
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    n_base_runs: int = 0
    n_new_runs: int = 0

    @property
    def regressions(self) -> list[Finding]:
        return [f for f in self.findings if f.regressed]


def _pct(base: float, new: float) -> float:
    return 100.0 * (new - base) / base if base > 0 else (0.0 if new == base else math.inf)


def _fmt_value(metric: str, v: float | None) -> str:
    if v is None:
        return "–"
    if math.isinf(v):
        return "miss"
    if metric in ("time", "target_time"):
        return f"{v:.3f} s"
    if metric == "acc":
        return f"{100 * v:.2f}%"
    return f"{v:.0f}"


def _relative(suite: str, entry: str, metric: str, base: float | None, new: float | None,
              limit: float | None, label: str) -> Finding | None:
    """A 'more is worse' number: regression when it grew by more than ``limit`` %."""
    if base is None or new is None or math.isinf(base):
        return None
    if math.isinf(new):
        return Finding(suite, entry, metric, base, new, None, limit, True,
                       f"{label}: {_fmt_value(metric, base)} -> never reached in NEW")
    change = _pct(base, new)
    bad = limit is not None and change > limit
    lim = f" (limit +{limit:g}%)" if limit is not None else ""
    return Finding(suite, entry, metric, base, new, change, limit, bad,
                   f"{label}: {_fmt_value(metric, base)} -> {_fmt_value(metric, new)} ({change:+.1f}%){lim}")


def _settings(score: scoring.SuiteScore, entry: str) -> dict[str, Any]:
    runs = score.scored_runs.get(entry) or []
    return {k: runs[0].config.get(k) for k in _SETTINGS} if runs else {}


def _mean_summary(score: scoring.SuiteScore, entry: str, key: str) -> float | None:
    """Seed mean of a summary total (steps, samples_seen) over the entry's scored runs."""
    runs = score.scored_runs.get(entry) or []
    vals = [float(r.summary[key]) for r in runs if isinstance(r.summary.get(key), (int, float))]
    return sum(vals) / len(vals) if vals else None


def _compare_entry(suite: str, b: scoring.EntryScore, n: scoring.EntryScore, bs: scoring.SuiteScore,
                   ns: scoring.SuiteScore, fail_on: dict[str, float], report: CompareReport) -> None:
    f = report.findings
    if b.train_time_s is not None and n.train_time_s is not None:
        got = _relative(suite, b.entry, "time", b.train_time_s.mean, n.train_time_s.mean,
                        fail_on.get("time"), "time")
        if got:
            f.append(got)
    if b.target is not None and n.target is not None and b.target.hits == b.target.n and b.target.n:
        label = f"time to {100 * b.target.target:g}%"
        got = _relative(suite, b.entry, "target_time", b.target.time_s.mean, n.target.time_s.mean,
                        fail_on.get("time"), label)
        if got:
            if math.isinf(n.target.time_s.mean):
                got.text = f"{label}: reached by every seed in BASE, by {n.target.hits}/{n.target.n} in NEW"
                got.regressed = True  # always: the policy no longer gets there
            f.append(got)
    if b.final_acc is not None and n.final_acc is not None:
        drop_pp = 100.0 * (b.final_acc.mean - n.final_acc.mean)
        limit = fail_on.get("acc")
        bad = limit is not None and drop_pp > limit
        lim = f" (limit -{limit:g} pp)" if limit is not None else ""
        f.append(Finding(suite, b.entry, "acc", b.final_acc.mean, n.final_acc.mean, -drop_pp, limit, bad,
                         f"final val acc: {_fmt_value('acc', b.final_acc.mean)} -> "
                         f"{_fmt_value('acc', n.final_acc.mean)} ({-drop_pp:+.2f} pp){lim}"))
    for metric, key in (("steps", "steps"), ("samples", "samples_seen")):
        bv, nv = _mean_summary(bs, b.entry, key), _mean_summary(ns, n.entry, key)
        got = _relative(suite, b.entry, metric, bv, nv, fail_on.get(metric), metric)
        if got:
            f.append(got)
    if n.n_diverged and not b.n_diverged:
        f.append(Finding(suite, b.entry, "runs", 0, n.n_diverged, None, None, True,
                         f"diverged in NEW: seeds {', '.join(map(str, n.diverged_seeds))} (none in BASE)"))


def _load(path: Path, suite: str | None, which: str) -> list[scoring.RunRecord]:
    if not path.exists():
        raise CompareError(f"{which} results folder {path} does not exist")
    if not path.is_dir():
        raise CompareError(f"{which} results folder {path} is not a folder")
    runs = scoring.load_runs(path, suite)
    if not runs:
        where = f" of suite {suite}" if suite else ""
        raise CompareError(f"{which} results folder {path} holds no run folders{where}")
    return runs


def compare_results(base_dir: Path, new_dir: Path, suite: str | None = None,
                    fail_on: str | dict[str, float] = DEFAULT_FAIL_ON) -> CompareReport:
    """Compare two result folders (results dirs, suite folders or run folders); raises
    CompareError for bad input. The report's ``regressions`` decide the exit code."""
    criteria = parse_fail_on(fail_on) if isinstance(fail_on, str) else dict(fail_on)
    base_dir, new_dir = Path(base_dir), Path(new_dir)
    base_runs = _load(base_dir, suite, "BASE")
    new_runs = _load(new_dir, suite, "NEW")
    base_suites = {r.suite for r in base_runs}
    new_suites = {r.suite for r in new_runs}
    common = sorted(base_suites & new_suites)
    if not common:
        raise CompareError(f"BASE ({', '.join(sorted(base_suites))}) and NEW ({', '.join(sorted(new_suites))}) share no suite: compare results of the same suite")
    report = CompareReport(base_dir, new_dir, common, criteria,
                           n_base_runs=len(base_runs), n_new_runs=len(new_runs))
    for only, which in ((base_suites - new_suites, "BASE"), (new_suites - base_suites, "NEW")):
        for s in sorted(only):
            report.notes.append(f"suite {s} is only in {which}; not compared (--suite NAME picks one)")
    for s in common:
        bs = scoring.score_suite(base_runs, suite=s)
        ns = scoring.score_suite(new_runs, suite=s)
        new_by_name = {e.entry: e for e in ns.entries}
        base_names = {e.entry for e in bs.entries}
        for b in bs.entries:
            n = new_by_name.get(b.entry)
            if n is None or n.n == 0:
                report.findings.append(Finding(s, b.entry, "runs", b.n, 0, None, None, True,
                                               "no complete run in NEW"))
                continue
            if b.n == 0:
                report.notes.append(f"{s} {b.entry}: no complete run in BASE; not compared")
                continue
            if sorted(b.seeds) != sorted(n.seeds):
                report.notes.append(f"{s} {b.entry}: seeds differ (BASE {b.seeds}, NEW {n.seeds})")
            bset, nset = _settings(bs, b.entry), _settings(ns, b.entry)
            diff = [k for k in _SETTINGS if bset.get(k) != nset.get(k)]
            if diff:
                report.notes.append(f"{s} {b.entry}: settings differ: " + ", ".join(
                    f"{k} {json.dumps(bset.get(k))} -> {json.dumps(nset.get(k))}" for k in diff))
            _compare_entry(s, b, n, bs, ns, criteria, report)
        for e in ns.entries:
            if e.entry not in base_names:
                report.notes.append(f"{s} {e.entry}: only in NEW; not compared")
    return report


def format_report(report: CompareReport) -> str:
    """Every compared number per entry, then the verdict naming each regression."""
    crit = ", ".join(
        f"{k} +{v:g}%" if METRICS[k][0] == "%" else f"{k} -{v:g} pp" for k, v in report.fail_on.items()
    ) or "none"
    lines = [
        f"BASE {report.base_dir} ({report.n_base_runs} runs) vs NEW {report.new_dir} ({report.n_new_runs} runs); "
        f"suites: {', '.join(report.suites)}; fail on: {crit}",
    ]
    current: tuple[str, str] | None = None
    for f in report.findings:
        if (f.suite, f.entry) != current:
            current = (f.suite, f.entry)
            lines.append(f"{f.suite} {f.entry}")
        lines.append(f"  {'REGRESSION ' if f.regressed else ''}{f.text}")
    for note in report.notes:
        lines.append(f"note: {note}")
    regs = report.regressions
    if regs:
        lines.append(f"{len(regs)} regression{'s' if len(regs) != 1 else ''}:")
        lines.extend(f"  {f.suite} {f.entry}: {f.text}" for f in regs)
    else:
        entries = len({(f.suite, f.entry) for f in report.findings})
        lines.append(f"no regressions ({entries} entr{'ies' if entries != 1 else 'y'} compared)")
    return "\n".join(lines)
