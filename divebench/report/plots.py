"""The report's charts (matplotlib, Agg backend: no display needed).

One PNG per chart and suite; one line per entry (the mean over its complete seeds) and a
shaded band from the lowest to the highest seed (min–max, not a confidence interval:
with 2–5 seeds it shows every seed's spread honestly). Seeds are aligned by epoch; on
time and sample axes each epoch sits at the seed mean of that x value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: reports are written on headless machines
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from divebench.scoring import RunRecord, SuiteScore, paper_metric, speedup  # noqa: E402

DPI = 110
FIGSIZE = (7.5, 4.6)
BAND_NOTE = "line: mean over seeds; band: min–max over seeds"


@dataclass
class Curve:
    """One entry's y over epochs, aligned over seeds."""

    epochs: list[int]
    x: list[float]  # seed mean of the x field per epoch
    mean: list[float]
    lo: list[float]
    hi: list[float]
    n: int


def save_png(fig: Any, path: Path) -> Path:
    """Render the figure in memory, then replace ``path`` atomically (a full disk leaves
    the old file or none, never a truncated PNG under the final name)."""
    import io

    from divebench.results import atomic_write_bytes

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=DPI)
    finally:
        plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _ok(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def curve(runs: Sequence[RunRecord], y: str, x: str = "epoch", scale: float = 1.0) -> Curve | None:
    """Seed mean, min and max of ``y`` per epoch (epochs where at least one seed has it).

    Epochs where only some seeds have a value (e.g. statistics measured on different
    epochs) use those seeds: ``n`` is the number of seeds overall.
    """
    per_seed = [{int(r["epoch"]): r for r in run.rows} for run in runs if run.rows]
    if not per_seed:
        return None
    epochs = sorted(set().union(*per_seed))
    out = Curve([], [], [], [], [], len(per_seed))
    for e in epochs:
        ys = [s[e][y] * scale for s in per_seed if e in s and _ok(s[e].get(y))]
        xs = [float(s[e][x]) for s in per_seed if e in s and _ok(s[e].get(x))]
        if not ys or not xs:
            continue
        out.epochs.append(e)
        out.x.append(sum(xs) / len(xs))
        out.mean.append(sum(ys) / len(ys))
        out.lo.append(min(ys))
        out.hi.append(max(ys))
    return out if out.epochs else None


def _minor_log(v: float, _pos: Any) -> str:
    """Label the 2× and 5× minor ticks of a log axis that spans less than a decade or two."""
    lead = v / 10 ** math.floor(math.log10(v)) if v > 0 else 0
    return f"{v:g}" if round(lead) in (2, 5) else ""


def _colors(names: Sequence[str]) -> dict[str, Any]:
    cmap = plt.get_cmap("tab10")
    return {n: cmap(i % 10) for i, n in enumerate(names)}


def _thousands(v: float, _pos: Any) -> str:
    if abs(v) >= 1e6:
        return f"{v / 1e6:g}M"
    if abs(v) >= 1e3:
        return f"{v / 1e3:g}k"
    return f"{v:g}"


def _finish(
    fig: Any, ax: Any, title: str, xlabel: str, ylabel: str, path: Path, note: str = BAND_NOTE
) -> Path:
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(fontsize=8, loc="best", framealpha=0.85)
    fig.text(0.99, 0.01, note, ha="right", va="bottom", fontsize=7, color="0.4")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return save_png(fig, path)


def _label(score: SuiteScore, name: str) -> str:
    e = score.entry(name)
    extra = f" (n={e.n}" + (f", {e.n_diverged} diverged" if e.n_diverged else "") + ")"
    return f"{name}{extra}" if e.policy == name else f"{name} [{e.policy}]{extra}"


def _line_chart(
    score: SuiteScore,
    path: Path,
    y: str,
    x: str,
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    scale: float = 1.0,
    step: bool = False,
    logy: bool = False,
    markers: bool = False,
    mark_paper: bool = False,
    target_line: bool = False,
) -> Path | None:
    names = [e.entry for e in score.entries]
    colors = _colors(names)
    # a dash pattern per entry too: overlapping lines (same LR, same batch size) stay visible
    dashes = {n: ["-", "--", "-.", (0, (1, 1.5))][i % 4] for i, n in enumerate(names)}
    fig, ax = plt.subplots(figsize=FIGSIZE)
    drawn = 0
    for name in names:
        c = curve(score.scored_runs.get(name, []), y, x, scale)
        if c is None:
            continue
        drawn += 1
        if step:
            # the value of epoch e holds over the whole epoch: the interval [e-1, e]
            xs = [e - 1 for e in c.epochs] + [c.epochs[-1]]
            ax.plot(
                xs,
                c.mean + c.mean[-1:],
                color=colors[name],
                label=_label(score, name),
                drawstyle="steps-post",
                linewidth=1.6,
                linestyle=dashes[name],
            )
            if c.n > 1:
                ax.fill_between(
                    xs,
                    c.lo + c.lo[-1:],
                    c.hi + c.hi[-1:],
                    color=colors[name],
                    alpha=0.18,
                    linewidth=0,
                    step="post",
                )
        elif markers:
            # sparse measurements: points with min–max error bars, a faint guide between them
            err = [
                [m - lo for m, lo in zip(c.mean, c.lo, strict=True)],
                [hi - m for m, hi in zip(c.mean, c.hi, strict=True)],
            ]
            ax.errorbar(
                c.x,
                c.mean,
                yerr=err if c.n > 1 else None,
                color=colors[name],
                label=_label(score, name),
                marker="o",
                markersize=4.5,
                linestyle=":",
                linewidth=1.0,
                capsize=3,
            )
        else:
            ax.plot(
                c.x,
                c.mean,
                color=colors[name],
                label=_label(score, name),
                linewidth=1.6,
                linestyle=dashes[name],
            )
            if c.n > 1:
                ax.fill_between(c.x, c.lo, c.hi, color=colors[name], alpha=0.18, linewidth=0)
        if mark_paper:
            e = score.entry(name)
            if e.paper is not None and e.paper.epoch in c.epochs:
                i = c.epochs.index(e.paper.epoch)
                ax.plot(
                    [c.x[i]],
                    [c.mean[i]],
                    marker="*",
                    markersize=11,
                    color=colors[name],
                    markeredgecolor="black",
                    markeredgewidth=0.6,
                    linestyle="none",
                )
    if not drawn:
        plt.close(fig)
        return None
    if target_line and score.target_accuracy:
        ax.axhline(
            score.target_accuracy * scale,
            color="0.3",
            linestyle="--",
            linewidth=1,
            label=f"target {score.target_accuracy * scale:g}%",
        )
    if logy:
        ax.set_yscale("log", base=2 if y == "batch_size" else 10)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:g}"))
        if y != "batch_size":
            ax.yaxis.set_minor_formatter(FuncFormatter(_minor_log))
    if x in ("samples_seen", "step"):
        ax.xaxis.set_major_formatter(FuncFormatter(_thousands))
    if x == "epoch":
        ax.xaxis.get_major_locator().set_params(integer=True)
        last = max(
            (
                int(r["epoch"])
                for runs in score.scored_runs.values()
                for run in runs
                for r in run.rows
            ),
            default=1,
        )
        ax.set_xlim(0 if step else 0.5, last + (0 if step else 0.5))
    note = "points: mean over seeds; bars: min–max over seeds" if markers else BAND_NOTE
    if mark_paper:
        note += "; ★ first epoch within 1 point of the entry's final mean"
    return _finish(fig, ax, title, xlabel, ylabel, path, note)


# (file stem, y field, x field, title, x label, y label, options)
CHARTS: list[tuple[str, str, str, str, str, str, dict[str, Any]]] = [
    (
        "val_acc-vs-time",
        "val_acc",
        "train_time_s",
        "Validation accuracy vs training time",
        "training time (s, evaluation excluded)",
        "validation accuracy (%)",
        {"scale": 100.0, "mark_paper": True, "target_line": True},
    ),
    (
        "val_acc-vs-samples",
        "val_acc",
        "samples_seen",
        "Validation accuracy vs samples seen",
        "training samples seen",
        "validation accuracy (%)",
        {"scale": 100.0, "target_line": True},
    ),
    (
        "batch_size-vs-epoch",
        "batch_size",
        "epoch",
        "Batch size per epoch",
        "epoch",
        "batch size (samples, log scale)",
        {"step": True, "logy": True},
    ),
    (
        "grad_diversity-vs-epoch",
        "n_grad_diversity",
        "epoch",
        "Gradient diversity n·Δ̂ (measured epochs)",
        "epoch",
        "n·Δ̂ (log scale)",
        {"logy": True, "markers": True},
    ),
    (
        "lr-vs-epoch",
        "lr",
        "epoch",
        "Learning rate per epoch (at the epoch's last step)",
        "epoch",
        "learning rate",
        {},
    ),
]


PARETO_NOTE = "small dots: one seed each; large marker: the entry's seed mean (the table's ×time / ×steps and Δ pp)"


def pareto_points(score: SuiteScore) -> dict[str, list[tuple[float, float | None, float | None]]]:
    """Per non-baseline entry, one (Δ pp, ×time, ×steps) per complete seed: its final
    accuracy minus the baseline's seed mean, and the baseline's seed-mean time (steps) to
    within 1 point of its final accuracy over that seed's own (the paper's metric, per
    seed). Empty without a scored baseline."""
    if score.baseline is None:
        return {}
    try:
        base = score.entry(score.baseline)
    except KeyError:
        return {}
    if base.paper is None or base.final_acc is None:
        return {}
    out: dict[str, list[tuple[float, float | None, float | None]]] = {}
    for e in score.entries:
        if e.entry == score.baseline:
            continue
        pts = []
        for run in score.scored_runs.get(e.entry, []):
            accs = [r["val_acc"] for r in run.rows if _ok(r.get("val_acc"))]
            pm = paper_metric([run.rows]) if run.rows else None
            if not accs or pm is None:
                continue
            pts.append((100.0 * (accs[-1] - base.final_acc.mean), speedup(base.paper.time_s, pm.time_s),
                        speedup(base.paper.steps, pm.steps)))
        if pts:
            out[e.entry] = pts
    return out


_PARETO_MARKERS = ("D", "s", "^", "v", "P", "X")


def pareto_chart(score: SuiteScore, path: Path) -> Path | None:
    """Speed-up (time, steps) against the accuracy change, per seed and per entry mean.

    The x axis spans the entries' means (and 0) with a margin; a seed beyond it (a run
    that fell far below the baseline) is drawn at the edge as a '<' and counted in the
    note, so one collapsed seed does not flatten every other point."""
    points = pareto_points(score)
    if not points:
        return None
    names = list(points)
    cmap = plt.get_cmap("tab20")
    style = {n: (cmap(i % 20), _PARETO_MARKERS[(i // 20) % len(_PARETO_MARKERS)]) for i, n in enumerate(names)}
    means = [score.entry(n).acc_diff_pp for n in names]
    finite = [m for m in means if m is not None and math.isfinite(m)] + [0.0]
    lo, hi = min(finite), max(finite)
    pad = max(1.0, 0.15 * (hi - lo))
    lo, hi = lo - pad, hi + pad
    clipped = 0
    rows = -(-len(names) // 3)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2 + 0.2 * rows), sharex=True)
    for ax, col, key, what in ((axes[0], 1, "paper_time", "time"), (axes[1], 2, "paper_steps", "steps")):
        for name in names:
            e = score.entry(name)
            color, marker = style[name]
            pts = [p for p in points[name] if _ok(p[col])]
            inside = [p for p in pts if lo <= p[0] <= hi]
            outside = [p for p in pts if not lo <= p[0] <= hi]
            ax.scatter([p[0] for p in inside], [p[col] for p in inside], s=14, color=color, alpha=0.6)
            if outside:
                ax.scatter([lo if p[0] < lo else hi for p in outside], [p[col] for p in outside], s=40,
                           color=color, marker="<" if outside[0][0] < lo else ">", alpha=0.8)
                clipped += len(outside) if col == 1 else 0
            mean_y = e.speedups.get(key)
            if e.acc_diff_pp is not None and _ok(mean_y):
                ax.scatter([min(max(e.acc_diff_pp, lo), hi)], [mean_y], s=70, color=color, edgecolors="black",
                           linewidths=0.6, marker=marker, label=f"{name} (n={e.n})")
        ax.set_xlim(lo, hi)
        ax.axhline(1.0, color="0.5", lw=0.8, ls="--")
        ax.axvline(0.0, color="0.5", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:g}×"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, p: (_minor_log(v, p) + "×") if _minor_log(v, p) else ""))
        ax.set_xlabel(f"final accuracy − {score.baseline}'s (pp)")
        ax.set_ylabel(f"speed-up in {what} to ±1 point (×)")
        ax.set_title(f"{score.suite}: speed-up in {what} vs accuracy change", fontsize=10)
        ax.grid(True, alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=3, framealpha=0.85)
    note = PARETO_NOTE + (f"; {clipped} seed(s) beyond the x range drawn at its edge (< >)" if clipped else "")
    fig.text(0.99, 0.995, note, ha="right", va="top", fontsize=7, color="0.4")
    fig.tight_layout(rect=(0, 0.035 * rows + 0.02, 1, 0.97))
    return save_png(fig, path)


def suite_charts(score: SuiteScore, out_dir: Path) -> dict[str, Path]:
    """Write the suite's PNGs into ``out_dir``; returns chart stem -> path.

    A chart with nothing to draw (e.g. no entry measured gradient diversity) is skipped.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    for stem, y, x, title, xlabel, ylabel, opts in CHARTS:
        path = out_dir / f"{score.suite}-{stem}.png"
        made = _line_chart(
            score, path, y, x, title=f"{score.suite}: {title}", xlabel=xlabel, ylabel=ylabel, **opts
        )
        if made is not None:
            out[stem] = made
    made = pareto_chart(score, out_dir / f"{score.suite}-pareto.png")
    if made is not None:
        out["pareto"] = made
    return out
