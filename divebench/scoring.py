"""Scores computed from run folders alone: the paper metric, time to a fixed target,
seed statistics and speed-ups against a baseline entry.

Definitions (docs: architecture.md "Scores", algorithms.md "What converges faster means"):

- **Seeds.** Every number of an entry is over its *scored* runs: status ``complete``.
  ``diverged`` runs are flagged, count as a miss for the fixed target and are left out of
  the accuracy statistics and of the paper metric (a diverged curve would drag the seed
  mean to chance level and its epochs stop early). ``interrupted``, ``failed``,
  ``running`` and folders without ``summary.json`` are listed as not scored. When the same
  (entry, seed) ran more than once, the newest scorable run counts and the others are
  listed as superseded.
- **Mean ± standard error** over seeds, SE = std(ddof=1)/sqrt(n); with one seed SE is
  undefined (``None``, shown as ``–``).
- **Paper metric.** Average validation accuracy over seeds per epoch; ``final`` is the mean
  at the last epoch; the first epoch whose mean is at least ``final - 0.01`` (accuracies
  are fractions, so 0.01 is one percentage point) is the convergence epoch. Its time is
  the sum, over epochs up to it, of the per-epoch training time averaged over seeds
  (``epoch_train_time_s``); its steps and samples are the seed means of the cumulative
  ``step`` and ``samples_seen`` there. Seeds are aligned by epoch number; only epochs that
  every seed completed are used.
- **Fixed-target metric.** Per seed: the first evaluation with ``val_acc >= target``; its
  cumulative ``train_time_s``, ``step`` and ``samples_seen``. A miss (never reached, or a
  diverged run) is ``math.inf``. Over seeds the mean and SE are reported only when every
  seed hit; otherwise the mean is ``math.inf`` and the hits are reported as k/n. A single
  slow seed therefore cannot hide behind the others.
- **Speed-up** = baseline value / entry value, for time, steps and samples. When the entry
  misses and the baseline does not, the speed-up is ``0.0`` (shown "miss"); when the
  baseline misses and the entry does not, it is ``math.inf`` (shown "∞"); when both miss
  it is ``None`` (shown "–"). Accuracy difference = entry final mean − baseline final
  mean, in percentage points.

Steps and samples are hardware-independent: they separate what a policy gains
algorithmically from what large batches gain in throughput.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

SCORED_STATUSES = ("complete",)
FLAGGED_STATUSES = ("diverged",)
# Tolerance for "mean >= final - 1 point": float sums of identical accuracies must compare
# equal, a genuine difference of 1e-9 is far below any accuracy resolution.
_EPS = 1e-12
# Settings that must agree between the seeds of one entry for their mean to mean something.
_CONSISTENT_KEYS = (
    "dataset",
    "data",
    "model",
    "n_samples",
    "subset",
    "epochs",
    "batch_size",
    "max_batch_size",
    "lr",
    "lr_schedule",
    "momentum",
    "weight_decay",
    "policy_name",
    "policy_config",
)
_RUN_MARKERS = ("summary.json", "metrics.jsonl", "config.yaml")


# ----------------------------------------------------------------------------- records


@dataclass
class RunRecord:
    """One run folder as read from disk.

    ``status`` is the summary's status, ``"incomplete"`` when the folder has no
    ``summary.json`` (still running, or killed before writing it) and ``"unreadable"``
    when the folder cannot be attributed to a suite, entry and seed. ``problems`` holds
    one line per thing that was wrong with the folder (corrupt line, missing file, ...).
    """

    path: Path
    run_id: str
    suite: str
    entry: str
    policy: str
    seed: int | None
    status: str
    config: dict[str, Any]
    env: dict[str, Any]
    summary: dict[str, Any]
    rows: list[dict[str, Any]]
    problems: list[str] = field(default_factory=list)

    @property
    def scorable(self) -> bool:
        """Complete or diverged: the run counts in the scores (diverged as a miss)."""
        return self.status in SCORED_STATUSES + FLAGGED_STATUSES


def _num(value: Any) -> Any:
    """Undo results.py's JSON cleaning: 'nan' / 'inf' strings back to floats."""
    if isinstance(value, str) and value.lower() in ("nan", "inf", "-inf", "infinity", "-infinity"):
        return float(value)
    return value


def _read_json(path: Path, problems: list[str]) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        problems.append(f"{path.name} cannot be read ({exc.__class__.__name__}: {exc})")
        return None
    if not isinstance(obj, dict):
        problems.append(f"{path.name} does not hold a JSON object")
        return None
    return obj


def _read_metrics(path: Path, problems: list[str]) -> list[dict[str, Any]]:
    """Every parseable row; a corrupt line (e.g. cut by a crash) is skipped and reported."""
    if not path.exists():
        problems.append("no metrics.jsonl")
        return []
    rows: list[dict[str, Any]] = []
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        problems.append(f"metrics.jsonl cannot be read ({exc})")
        return []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            problems.append(f"metrics.jsonl line {i} is not valid JSON; skipped")
            continue
        if not isinstance(row, dict) or "epoch" not in row:
            problems.append(f"metrics.jsonl line {i} is not a metrics row; skipped")
            continue
        rows.append({k: _num(v) for k, v in row.items()})
    rows.sort(key=lambda r: r["epoch"])
    return rows


def read_run(path: Path) -> RunRecord:
    """Read one run folder; never raises for a damaged folder (see ``RunRecord.problems``)."""
    path = Path(path)
    problems: list[str] = []
    config: dict[str, Any] = {}
    cpath = path / "config.yaml"
    if cpath.exists():
        try:
            loaded = yaml.safe_load(cpath.read_text())
            config = loaded if isinstance(loaded, dict) else {}
            if not isinstance(loaded, dict):
                problems.append("config.yaml does not hold a mapping")
        except (OSError, yaml.YAMLError) as exc:
            problems.append(f"config.yaml cannot be read ({exc.__class__.__name__})")
    else:
        problems.append("no config.yaml")
    env = _read_json(path / "env.json", problems) or {}
    summary = _read_json(path / "summary.json", problems)
    if summary is None:
        if not (path / "summary.json").exists():
            problems.append("no summary.json: the run is still running or was killed")
        summary = {}
        status = "incomplete"
    else:
        status = str(summary.get("status", "incomplete"))
    rows = _read_metrics(path / "metrics.jsonl", problems)
    if status in ("running", "incomplete"):
        from divebench.results import run_is_held

        if run_is_held(path) is False:  # its writer is gone: killed, not running
            problems.append(f"stale: summary says {status} but no process holds the run; "
                            "continue it with resume=auto")
            status = "interrupted"

    suite = summary.get("suite") or config.get("suite") or ""
    entry = summary.get("entry") or config.get("entry") or ""
    policy = summary.get("policy") or config.get("policy_name") or entry
    seed = summary.get("seed", config.get("seed"))
    if not suite or not entry or not isinstance(seed, int) or isinstance(seed, bool):
        problems.append("cannot tell the suite, entry and seed of this folder; not scored")
        status = "unreadable"
        seed = seed if isinstance(seed, int) and not isinstance(seed, bool) else None
    return RunRecord(
        path=path,
        run_id=str(summary.get("run_id") or path.name),
        suite=str(suite or path.parent.name),
        entry=str(entry or "?"),
        policy=str(policy or "?"),
        seed=seed,
        status=status,
        config=config,
        env=env,
        summary=summary,
        rows=rows,
        problems=problems,
    )


def _is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / m).exists() for m in _RUN_MARKERS)


def _run_dirs(root: Path, suite: str | None) -> list[Path]:
    """Run folders under ``root``: ``root`` itself, a suite folder, or a results folder."""
    if _is_run_dir(root):
        return [root]
    found: list[Path] = []
    if not root.is_dir():
        return found
    for child in sorted(root.iterdir()):
        if not child.is_dir() or child.name.startswith(".") or child.name == "wandb":
            continue
        if _is_run_dir(child):  # root is a suite folder
            found.append(child)
            continue
        if suite is not None and child.name != suite:
            continue
        found.extend(g for g in sorted(child.iterdir()) if _is_run_dir(g))
    return found


def load_runs(results_dirs: Path | Sequence[Path], suite: str | None = None) -> list[RunRecord]:
    """Read every run folder under ``results_dirs`` (``<dir>/<suite>/<run_id>/``).

    Several folders merge naturally (shards of one sweep writing to separate results
    folders); a run folder reached twice, or the same run id copied into two folders, is
    read once. ``suite`` keeps only that suite. Damaged folders are returned with their
    ``problems`` and a non-scorable status, never raised.
    """
    if isinstance(results_dirs, (str, Path)):
        results_dirs = [Path(results_dirs)]
    records: list[RunRecord] = []
    seen_paths: set[Path] = set()
    seen_ids: dict[tuple[str, str], Path] = {}
    for root in results_dirs:
        for path in _run_dirs(Path(root), suite):
            real = path.resolve()
            if real in seen_paths:
                continue
            seen_paths.add(real)
            rec = read_run(path)
            if suite is not None and rec.suite != suite:
                continue
            key = (rec.suite, rec.run_id)
            if key in seen_ids:
                continue  # the same run copied into two results folders
            seen_ids[key] = path
            records.append(rec)
    return records


# ----------------------------------------------------------------------------- statistics


@dataclass
class Stat:
    """Mean ± standard error over ``n`` seeds; ``se`` is None when n < 2 or undefined."""

    mean: float
    se: float | None
    n: int


def mean_se(values: Iterable[float]) -> Stat | None:
    """Mean and standard error (std with ddof=1, over sqrt(n)); None for no values.

    Any infinite value makes the mean infinite and the SE undefined.
    """
    vals = [float(v) for v in values]
    if not vals:
        return None
    if any(math.isinf(v) for v in vals):
        return Stat(math.inf, None, len(vals))
    mean = statistics.fmean(vals)
    se = statistics.stdev(vals) / math.sqrt(len(vals)) if len(vals) > 1 else None
    return Stat(mean, se, len(vals))


def speedup(baseline_value: float | None, value: float | None) -> float | None:
    """baseline / value; 0.0 when only the entry misses, inf when only the baseline does,
    None when both miss or either is unknown."""
    if baseline_value is None or value is None:
        return None
    if math.isnan(baseline_value) or math.isnan(value):
        return None
    b_miss, v_miss = math.isinf(baseline_value), math.isinf(value)
    if b_miss and v_miss:
        return None
    if v_miss:
        return 0.0
    if b_miss:
        return math.inf
    if value <= 0:
        return None
    return baseline_value / value


# ----------------------------------------------------------------------------- per-run scores


@dataclass
class TargetHit:
    """Where one run first reached the target (all ``math.inf`` for a miss)."""

    epoch: float
    train_time_s: float
    step: float
    samples_seen: float

    @property
    def hit(self) -> bool:
        return math.isfinite(self.train_time_s)


MISS = TargetHit(math.inf, math.inf, math.inf, math.inf)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def time_to_target(rows: Sequence[dict[str, Any]], target: float) -> TargetHit:
    """First evaluation with ``val_acc >= target`` (a fraction); ``MISS`` if none.

    The run's totals at that row (cumulative training time, optimiser steps, samples)
    are what it cost to get there. The lead writes this into summary.json per run.
    """
    for row in rows:
        acc = row.get("val_acc")
        if _finite(acc) and acc >= target - _EPS:
            return TargetHit(
                float(row["epoch"]),
                float(row.get("train_time_s", math.nan)),
                float(row.get("step", math.nan)),
                float(row.get("samples_seen", math.nan)),
            )
    return MISS


def _epoch_times(rows: Sequence[dict[str, Any]]) -> dict[int, float]:
    """Training seconds of each epoch: ``epoch_train_time_s``, or the difference of the
    cumulative ``train_time_s`` for rows that lack it."""
    out: dict[int, float] = {}
    prev_cum, prev_epoch = 0.0, 0
    for row in rows:
        e = int(row["epoch"])
        cum = row.get("train_time_s")
        t = row.get("epoch_train_time_s")
        if not _finite(t) and _finite(cum) and e == prev_epoch + 1:
            t = cum - prev_cum
        if _finite(t):
            out[e] = float(t)
        if _finite(cum):
            prev_cum = float(cum)
        prev_epoch = e
    return out


# ----------------------------------------------------------------------------- suite scores


@dataclass
class PaperMetric:
    """Time/epochs/steps/samples until the seed-mean val acc first reaches final − 1 point."""

    final_acc: float  # seed mean at the last common epoch (fraction)
    threshold: float  # final_acc - 0.01
    epoch: int  # 1-based convergence epoch
    time_s: float  # sum of the seed-mean per-epoch training times up to that epoch
    steps: float  # seed-mean cumulative optimiser steps there
    samples: float  # seed-mean cumulative samples there
    epochs_used: int  # epochs every seed completed


@dataclass
class TargetMetric:
    """Time to a fixed target over seeds; means are inf unless every seed hit."""

    target: float
    hits: int
    n: int
    time_s: Stat
    steps: Stat
    samples: Stat
    per_seed_time_s: dict[int, float]


@dataclass
class EntryScore:
    """Everything the report says about one entry (a named policy configuration)."""

    suite: str
    entry: str
    policy: str
    seeds: list[int]  # the seeds scored (complete runs)
    n_diverged: int
    diverged_seeds: list[int]
    final_acc: Stat | None
    best_acc: Stat | None
    train_time_s: Stat | None  # total timed training of a run
    stats_fraction: float | None  # statistics time / training time, summed over seeds
    peak_memory_mb: float | None  # largest peak over the seeds
    paper: PaperMetric | None
    target: TargetMetric | None
    # filled against the baseline; keys: paper_time, paper_steps, paper_samples,
    # target_time, target_steps, target_samples
    speedups: dict[str, float | None] = field(default_factory=dict)
    acc_diff_pp: float | None = None
    flags: list[str] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.seeds)


@dataclass
class SuiteScore:
    suite: str
    baseline: str | None
    target_accuracy: float | None
    entries: list[EntryScore]
    not_scored: list[RunRecord]  # failed / interrupted / running / unreadable / superseded
    problems: list[str]
    # the complete runs behind each entry's numbers (what the plots draw); not serialised
    scored_runs: dict[str, list[RunRecord]] = field(default_factory=dict, repr=False)

    def entry(self, name: str) -> EntryScore:
        for e in self.entries:
            if e.entry == name:
                return e
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (infinities as the string 'inf')."""
        d = {
            "suite": self.suite,
            "baseline": self.baseline,
            "target_accuracy": self.target_accuracy,
            "entries": [asdict(e) for e in self.entries],
            "not_scored": [
                {
                    "run_id": r.run_id,
                    "entry": r.entry,
                    "seed": r.seed,
                    "status": r.status,
                    "path": str(r.path),
                    "problems": r.problems,
                }
                for r in self.not_scored
            ],
            "problems": self.problems,
        }
        return _jsonable(d)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def paper_metric(seed_rows: Sequence[Sequence[dict[str, Any]]]) -> PaperMetric | None:
    """The paper's "time to ±1 %" over the seeds' metric rows (see module docstring)."""
    if not seed_rows:
        return None
    by_epoch = [
        {int(r["epoch"]): r for r in rows if _finite(r.get("val_acc"))} for rows in seed_rows
    ]
    times = [_epoch_times(rows) for rows in seed_rows]
    common = sorted(set.intersection(*(set(b) for b in by_epoch)))
    if not common:
        return None
    mean_acc = [statistics.fmean(b[e]["val_acc"] for b in by_epoch) for e in common]
    final = mean_acc[-1]
    threshold = final - 0.01
    idx = next(i for i, a in enumerate(mean_acc) if a >= threshold - _EPS)
    epoch = common[idx]
    # Per-epoch training time averaged over seeds, summed up to the convergence epoch.
    # Every epoch up to it counts, also ones whose val_acc row was lost; an epoch time
    # that no seed recorded contributes nothing (and is reported by the loader).
    time_s = 0.0
    for e in range(1, epoch + 1):
        vals = [t[e] for t in times if e in t]
        if vals:
            time_s += statistics.fmean(vals)
    steps = statistics.fmean(float(b[epoch].get("step", math.nan)) for b in by_epoch)
    samples = statistics.fmean(float(b[epoch].get("samples_seen", math.nan)) for b in by_epoch)
    return PaperMetric(final, threshold, epoch, time_s, steps, samples, len(common))


def _config_value(rec: RunRecord, key: str) -> Any:
    return rec.config.get(key)


def _select(
    runs: Sequence[RunRecord], suite: str
) -> tuple[list[RunRecord], list[RunRecord], list[str]]:
    """Scorable runs (newest per entry and seed) and the rest, with notes."""
    problems: list[str] = []
    chosen: dict[tuple[str, int], RunRecord] = {}
    rest: list[RunRecord] = []
    # run ids are "<entry>-s<seed>-<UTC stamp>-<random>": sorting orders reruns by time
    for rec in sorted((r for r in runs if r.suite == suite), key=lambda r: r.run_id):
        if not rec.scorable or rec.seed is None:
            rest.append(rec)
            continue
        key = (rec.entry, rec.seed)
        if key in chosen:
            old = chosen[key]
            old.problems.append(
                f"superseded by the newer run {rec.run_id} of the same entry and seed"
            )
            problems.append(f"{rec.entry} seed {rec.seed}: {old.run_id} superseded by {rec.run_id}")
            rest.append(old)
        chosen[key] = rec
    return list(chosen.values()), rest, problems


def _entry_order(runs: Sequence[RunRecord]) -> list[str]:
    """Entries in the order they were configured: a ``policy`` list in the configs when
    there is one, else the order the runs started (the suite's entry order), else names."""
    order: list[str] = []
    for rec in runs:
        listed = rec.config.get("policy")
        if isinstance(listed, list):
            order.extend(n for n in listed if isinstance(n, str) and n not in order)
    started: dict[str, str] = {}
    for rec in runs:
        t = str(rec.env.get("started_utc") or "~")  # "~" sorts after every timestamp
        started[rec.entry] = min(started.get(rec.entry, t), t)

    def key(name: str) -> tuple[int, str, str]:
        return (order.index(name) if name in order else len(order), started.get(name, "~"), name)

    return sorted({r.entry for r in runs}, key=key)


def _suite_setting(runs: Sequence[RunRecord], key: str, problems: list[str]) -> Any:
    """The value of ``key`` that most of the runs were configured with (None if no run has it)."""
    counts = Counter(json.dumps(r.config.get(key), sort_keys=True) for r in runs if key in r.config)
    if not counts:
        return None
    if len(counts) > 1:
        listed = ", ".join(f"{v} ({n} runs)" for v, n in counts.most_common())
        problems.append(f"runs disagree on {key}: {listed}; using the most common")
    return json.loads(counts.most_common(1)[0][0])


def score_suite(
    runs: Sequence[RunRecord],
    baseline: str | None = None,
    target_accuracy: float | None = None,
    suite: str | None = None,
) -> SuiteScore:
    """Score one suite's runs (see the module docstring for every definition).

    ``baseline`` (an entry name) and ``target_accuracy`` (a fraction; 0 = none) default
    to the runs' own configs when None; ``""``/0 switch them off. ``suite`` picks one
    suite when ``runs`` holds several (default: the only or first suite in ``runs``).
    """
    suites = sorted({r.suite for r in runs})
    if suite is None:
        suite = suites[0] if suites else ""
    chosen, rest, problems = _select(runs, suite)
    if baseline is None:
        baseline = _suite_setting(chosen, "baseline", problems) or None
    baseline = baseline or None
    if target_accuracy is None:
        target_accuracy = _suite_setting(chosen, "target_accuracy", problems)
    if not target_accuracy:
        target_accuracy = None
    elif target_accuracy > 1.0:
        problems.append(
            f"target_accuracy={target_accuracy} looks like a percentage; accuracies are fractions"
        )

    names = _entry_order(chosen)

    entries: list[EntryScore] = []
    scored_runs: dict[str, list[RunRecord]] = {}
    for name in names:
        recs = sorted((r for r in chosen if r.entry == name), key=lambda r: r.seed or 0)
        entries.append(_score_entry(suite, name, recs, target_accuracy, problems))
        scored_runs[name] = [r for r in recs if r.status in SCORED_STATUSES]
        for r in scored_runs[name]:  # a scored run's damage is said, not skipped in silence
            problems.extend(f"{r.run_id}: {p}" for p in r.problems)

    if baseline is not None:
        base = next((e for e in entries if e.entry == baseline), None)
        if base is None:
            problems.append(f"baseline '{baseline}' has no complete runs: no speed-ups")
        else:
            for e in entries:
                _compare(e, base)
    return SuiteScore(suite, baseline, target_accuracy, entries, rest, problems, scored_runs)


def _score_entry(
    suite: str, name: str, recs: list[RunRecord], target: float | None, problems: list[str]
) -> EntryScore:
    good = [r for r in recs if r.status in SCORED_STATUSES]
    diverged = [r for r in recs if r.status in FLAGGED_STATUSES]
    flags: list[str] = []
    if diverged:
        seeds = ", ".join(str(r.seed) for r in diverged)
        flags.append(f"diverged {len(diverged)}/{len(recs)} (seeds {seeds})")
    for key in _CONSISTENT_KEYS:
        vals = {json.dumps(r.config.get(key), sort_keys=True) for r in good if key in r.config}
        if len(vals) > 1:
            listed = " vs ".join(sorted(vals))
            flags.append(f"mixed {key}")
            problems.append(f"{name}: seeds ran with different {key} ({listed}); scored together")
    for r in good:
        if not r.rows:
            flags.append(f"seed {r.seed} has no metric rows")

    def last(rec: RunRecord, key: str) -> float | None:
        v = rec.summary.get(key)
        v = _num(v)
        if _finite(v):
            return float(v)
        vals = [
            row[key.replace("final_", "")]
            for row in rec.rows
            if _finite(row.get(key.replace("final_", "")))
        ]
        return float(vals[-1]) if vals else None

    def best(rec: RunRecord) -> float | None:
        v = _num(rec.summary.get("best_val_acc"))
        if _finite(v):
            return float(v)
        vals = [row["val_acc"] for row in rec.rows if _finite(row.get("val_acc"))]
        return max(vals) if vals else None

    finals = [v for v in (last(r, "final_val_acc") for r in good) if v is not None]
    bests = [v for v in (best(r) for r in good) if v is not None]
    totals = [v for v in (last(r, "train_time_s") for r in good) if v is not None]
    stats_s = sum(
        float(row.get("stats_time_s") or 0.0)
        for r in good
        for row in r.rows
        if _finite(row.get("stats_time_s"))
    )
    train_s = sum(totals)
    peaks = [
        row["peak_memory_mb"] for r in good for row in r.rows if _finite(row.get("peak_memory_mb"))
    ]

    paper = paper_metric([r.rows for r in good if r.rows]) if good else None
    tm: TargetMetric | None = None
    if target is not None:
        hits = {
            int(r.seed or 0): time_to_target(r.rows, target)
            if r.status in SCORED_STATUSES
            else MISS
            for r in recs
        }
        n_hit = sum(h.hit for h in hits.values())
        tm = TargetMetric(
            target=target,
            hits=n_hit,
            n=len(hits),
            time_s=mean_se(h.train_time_s for h in hits.values()) or Stat(math.inf, None, 0),
            steps=mean_se(h.step for h in hits.values()) or Stat(math.inf, None, 0),
            samples=mean_se(h.samples_seen for h in hits.values()) or Stat(math.inf, None, 0),
            per_seed_time_s={s: h.train_time_s for s, h in hits.items()},
        )
    return EntryScore(
        suite=suite,
        entry=name,
        policy=recs[0].policy,
        seeds=[int(r.seed or 0) for r in good],
        n_diverged=len(diverged),
        diverged_seeds=[int(r.seed or 0) for r in diverged],
        final_acc=mean_se(finals),
        best_acc=mean_se(bests),
        train_time_s=mean_se(totals),
        stats_fraction=(stats_s / train_s) if train_s > 0 else None,
        peak_memory_mb=max(peaks) if peaks else None,
        paper=paper,
        target=tm,
        flags=flags,
    )


def _compare(e: EntryScore, base: EntryScore) -> None:
    if e.paper is not None and base.paper is not None:
        e.speedups["paper_time"] = speedup(base.paper.time_s, e.paper.time_s)
        e.speedups["paper_steps"] = speedup(base.paper.steps, e.paper.steps)
        e.speedups["paper_samples"] = speedup(base.paper.samples, e.paper.samples)
    if e.target is not None and base.target is not None:
        e.speedups["target_time"] = speedup(base.target.time_s.mean, e.target.time_s.mean)
        e.speedups["target_steps"] = speedup(base.target.steps.mean, e.target.steps.mean)
        e.speedups["target_samples"] = speedup(base.target.samples.mean, e.target.samples.mean)
    if e.final_acc is not None and base.final_acc is not None:
        e.acc_diff_pp = 100.0 * (e.final_acc.mean - base.final_acc.mean)


def score_all(runs: Sequence[RunRecord]) -> dict[str, SuiteScore]:
    """One ``SuiteScore`` per suite found in ``runs`` (baseline and target from the configs)."""
    return {s: score_suite(runs, suite=s) for s in sorted({r.suite for r in runs})}


# ----------------------------------------------------------------------------- formatting


def fmt_speedup(x: float | None) -> str:
    """'5.00×', 'miss' (the entry never got there), '∞' (only the baseline missed), '–'."""
    if x is None:
        return "–"
    if x == 0.0:
        return "miss"
    if math.isinf(x):
        return "∞"
    return f"{x:.2f}×"


def fmt_pct(stat: Stat | None, digits: int = 2) -> str:
    """An accuracy Stat (fractions) as 'mean ± SE' in percent; '–' for an undefined SE."""
    if stat is None:
        return "–"
    se = "–" if stat.se is None else f"{100 * stat.se:.{digits}f}"
    return f"{100 * stat.mean:.{digits}f} ± {se}"


def fmt_stat(stat: Stat | None, digits: int = 1, miss: str = "miss") -> str:
    """A Stat as 'mean ± SE' ('miss' when infinite, '–' for no data or undefined SE)."""
    if stat is None or stat.n == 0:
        return "–"
    if math.isinf(stat.mean):
        return miss
    se = "–" if stat.se is None else _num_str(stat.se, digits)
    return f"{_num_str(stat.mean, digits)} ± {se}"


def _num_str(x: float, digits: int) -> str:
    if abs(x) >= 1e6:
        return f"{x:.3g}"
    return f"{x:,.{digits}f}"


def fmt_target(t: TargetMetric | None, what: str = "time_s", digits: int = 1) -> str:
    """Time (or steps, samples) to target, with 'miss (k/n hit)' when a seed missed."""
    if t is None:
        return "–"
    stat: Stat = getattr(t, what)
    if t.hits < t.n:
        return f"miss ({t.hits}/{t.n} hit)"
    return fmt_stat(stat, digits)


def fmt_pp(x: float | None) -> str:
    return "–" if x is None else f"{x:+.2f}"
