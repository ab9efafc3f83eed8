"""The local report: Markdown, a self-contained HTML page and a console table.

The report is built once as a list of blocks (headings, paragraphs, tables, images) and
rendered three ways, so the Markdown file, the HTML page (PNGs embedded as base64 data
URIs: one file to mail or attach) and the console agree cell for cell.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from divebench.report.plots import BAND_NOTE, suite_charts
from divebench.results import ResultsError, atomic_write_text
from divebench.scoring import (
    EntryScore,
    SuiteScore,
    fmt_pct,
    fmt_pp,
    fmt_speedup,
    fmt_stat,
    fmt_target,
    load_runs,
    score_all,
)

# ----------------------------------------------------------------------------- blocks


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    align: list[str] = field(default_factory=list)  # "l" or "r" per column


@dataclass
class Block:
    kind: str  # h1 h2 h3 p table img list
    text: str = ""
    table: Table | None = None
    path: Path | None = None
    items: list[str] = field(default_factory=list)


def _h(level: int, text: str) -> Block:
    return Block(f"h{level}", text)


# ----------------------------------------------------------------------------- tables


def _num(x: float | None, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if math.isinf(x):
        return "miss"
    if abs(x) >= 1e6:
        return f"{x:.3g}"
    return f"{x:,.{digits}f}"


def _flags(e: EntryScore) -> str:
    return "; ".join(e.flags) if e.flags else ""


def accuracy_table(score: SuiteScore) -> Table:
    """Final and best accuracy, total training time and costs, per entry."""
    rows = []
    for e in score.entries:
        stats = "–" if e.stats_fraction is None else f"{100 * e.stats_fraction:.1f}%"
        rows.append(
            [
                e.entry,
                e.policy,
                str(e.n),
                fmt_pct(e.final_acc),
                fmt_pct(e.best_acc),
                fmt_pp(e.acc_diff_pp),
                fmt_stat(e.train_time_s),
                stats,
                _num(e.peak_memory_mb, 0),
                _flags(e),
            ]
        )
    return Table(
        [
            "entry",
            "policy",
            "seeds",
            "final val acc %",
            "best val acc %",
            "Δ final vs baseline (pp)",
            "training time s",
            "statistics share",
            "peak memory MB",
            "flags",
        ],
        rows,
        list("llrrrrrrrl"),
    )


def matrix_table(score: SuiteScore) -> Table | None:
    """The ablation matrix (``cross.<key>=...``, or any entries of one policy that differ in
    their keys): one row per entry, a column per policy key whose value differs between
    entries of the same policy, then accuracy and speed-ups. None when no policy key varies."""
    configs: dict[str, dict[str, Any]] = {}
    for e in score.entries:
        runs = score.scored_runs.get(e.entry, [])
        if runs:
            configs[e.entry] = dict(runs[0].config.get("policy_config") or {})
    by_policy: dict[str, list[str]] = {}
    for e in score.entries:
        if e.entry in configs:
            by_policy.setdefault(e.policy, []).append(e.entry)
    keys: list[str] = []
    for names in by_policy.values():
        for k in sorted({k for n in names for k in configs[n]}):
            if len({json.dumps(configs[n].get(k), sort_keys=True) for n in names}) > 1 and k not in keys:
                keys.append(k)
    if not keys:
        return None
    rows = []
    for e in score.entries:
        cfg = configs.get(e.entry, {})
        sp = e.speedups
        rows.append([e.entry, e.policy, *("–" if k not in cfg else str(cfg[k]) for k in keys),
                     str(e.n), fmt_pct(e.final_acc), fmt_pp(e.acc_diff_pp), fmt_speedup(sp.get("paper_time")),
                     fmt_speedup(sp.get("paper_steps"))])
    return Table(["entry", "rule", *keys, "seeds", "final val acc %", "Δ pp", "×time", "×steps"], rows,
                 ["l", "l", *("l" for _ in keys), "r", "r", "r", "r", "r"])


def paper_table(score: SuiteScore) -> Table:
    """The paper metric: cost to come within 1 point of the entry's own final mean."""
    rows = []
    for e in score.entries:
        p = e.paper
        if p is None:
            rows.append([e.entry, "–", "–", "–", "–", "–", "–", "–", "–"])
            continue
        sp = e.speedups
        rows.append(
            [
                e.entry,
                f"{100 * p.final_acc:.2f}",
                f"{p.epoch} / {p.epochs_used}",
                _num(p.time_s),
                _num(p.steps, 0),
                _num(p.samples, 0),
                fmt_speedup(sp.get("paper_time")),
                fmt_speedup(sp.get("paper_steps")),
                fmt_speedup(sp.get("paper_samples")),
            ]
        )
    return Table(
        [
            "entry",
            "final (seed mean) %",
            "epoch",
            "time s",
            "steps",
            "samples",
            "speed-up time",
            "speed-up steps",
            "speed-up samples",
        ],
        rows,
        list("lrrrrrrrr"),
    )


def target_table(score: SuiteScore) -> Table:
    """Cost to reach the suite's fixed target; a miss is a miss, not a number."""
    rows = []
    for e in score.entries:
        t = e.target
        sp = e.speedups
        if t is None:
            continue
        rows.append(
            [
                e.entry,
                f"{t.hits}/{t.n}",
                fmt_target(t, "time_s"),
                fmt_target(t, "steps", 0),
                fmt_target(t, "samples", 0),
                fmt_speedup(sp.get("target_time")),
                fmt_speedup(sp.get("target_steps")),
                fmt_speedup(sp.get("target_samples")),
            ]
        )
    return Table(
        [
            "entry",
            "seeds hit",
            "time s",
            "steps",
            "samples",
            "speed-up time",
            "speed-up steps",
            "speed-up samples",
        ],
        rows,
        list("lrrrrrrr"),
    )


def console_table(score: SuiteScore) -> Table:
    rows = []
    for e in score.entries:
        p, sp = e.paper, e.speedups
        rows.append(
            [
                e.entry,
                f"{e.n}" + (f" (+{e.n_diverged} div)" if e.n_diverged else ""),
                fmt_pct(e.final_acc),
                fmt_pp(e.acc_diff_pp),
                "–" if p is None else str(p.epoch),
                "–" if p is None else _num(p.time_s),
                fmt_speedup(sp.get("paper_time")),
                fmt_speedup(sp.get("paper_steps")),
                fmt_speedup(sp.get("paper_samples")),
                *(
                    [fmt_target(e.target), fmt_speedup(sp.get("target_time"))]
                    if score.target_accuracy
                    else []
                ),
            ]
        )
    headers = [
        "entry",
        "seeds",
        "final acc %",
        "Δ pp",
        "±1% ep",
        "±1% time s",
        "×time",
        "×steps",
        "×samples",
    ]
    if score.target_accuracy:
        headers += [f"time to {100 * score.target_accuracy:g}% s", "×target"]
    return Table(headers, rows, list("lrrrrrrrr") + (["r", "r"] if score.target_accuracy else []))


def _plain(table: Table) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in table.rows)) if table.rows else len(h)
        for i, h in enumerate(table.headers)
    ]
    align = table.align or ["l"] * len(widths)

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if a == "r" else c.ljust(w)
            for c, w, a in zip(cells, widths, align, strict=True)
        ).rstrip()

    return "\n".join(
        [line(table.headers), line(["-" * w for w in widths]), *(line(r) for r in table.rows)]
    )


def format_table(score: SuiteScore) -> str:
    """The comparison table ``divebench run`` prints at the end (plain text)."""
    head = f"suite {score.suite}"
    if score.baseline:
        head += f" — speed-ups vs {score.baseline}"
    lines = [
        head,
        _plain(console_table(score)),
        "±1%: first epoch whose seed-mean val acc is within 1 point of the entry's final mean; "
        "× = baseline / entry (miss: never got there). Final acc: mean ± SE over seeds.",
    ]
    for e in score.entries:
        if e.flags:
            lines.append(f"! {e.entry}: {_flags(e)}")
    for p in score.problems:
        lines.append(f"! {p}")
    if score.not_scored:
        counts = Counter(r.status for r in score.not_scored)
        lines.append("not scored: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
        for r in score.not_scored[:5]:  # why, for folders that are damaged or stale
            if r.problems:
                lines.append(f"  {r.path}: {'; '.join(r.problems)}")
        if sum(bool(r.problems) for r in score.not_scored) > 5:
            lines.append("  ... (the report's 'Runs not scored' lists every one)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- document


def _environment(score: SuiteScore) -> Table:
    """Which machines and versions produced the numbers (one row per distinct setup)."""
    counts: Counter[tuple[str, ...]] = Counter()
    for runs in score.scored_runs.values():
        for r in runs:
            env = r.env
            sha = str(env.get("git_sha") or "?")[:10] + ("+dirty" if env.get("git_dirty") else "")
            counts[
                (
                    str(env.get("device_name") or env.get("device") or "?"),
                    str(env.get("torch") or "?"),
                    str(env.get("cuda") or "–"),
                    str(env.get("python") or "?"),
                    sha,
                    str(env.get("hostname") or "?"),
                )
            ] += 1
    rows = [[*k, str(n)] for k, n in sorted(counts.items())]
    return Table(
        ["device", "torch", "CUDA", "python", "git", "host", "runs"], rows, list("llllllr")
    )


def suite_blocks(score: SuiteScore, charts: dict[str, Path]) -> list[Block]:
    """The blocks of one suite's section."""
    b: list[Block] = [_h(2, f"Suite {score.suite}")]
    target = "none"
    if score.target_accuracy:
        target = f"{100 * score.target_accuracy:g}% validation accuracy"
    facts = [
        f"entries: {len(score.entries)}",
        f"baseline: {score.baseline or 'none (no speed-ups)'}",
        f"fixed target: {target}",
    ]
    b.append(Block("p", "; ".join(facts) + "."))
    b.append(_h(3, "Accuracy"))
    b.append(
        Block(
            "p",
            "Mean ± standard error over seeds (SE = sample std / √n; '–' with one seed). "
            "Statistics share: time spent on gradient statistics within the timed training.",
        )
    )
    b.append(Block("table", table=accuracy_table(score)))
    matrix = matrix_table(score)
    if matrix is not None:
        b.append(_h(3, "Ablation matrix"))
        b.append(Block("p", "The policy keys that differ between entries of one policy (e.g. from "
                       "cross.<key>=...), with accuracy change and speed-ups against the baseline "
                       "(× = to within 1 point of the entry's own final accuracy; '–': the policy has no "
                       "such key). The Pareto chart below shows every seed."))
        b.append(Block("table", table=matrix))
    b.append(_h(3, "Time to within 1 point of the entry's own final accuracy (the paper's metric)"))
    b.append(
        Block(
            "p",
            "Seed-mean validation accuracy per epoch; the first epoch at or above the "
            "final mean minus 1 percentage point; time is the sum of the seed-mean "
            "per-epoch training times up to it (evaluation excluded). Each entry is "
            "measured against its own plateau, so an entry that plateaus lower can look "
            "faster: read it beside the fixed-target table. Steps and samples do not "
            "depend on the hardware.",
        )
    )
    b.append(Block("table", table=paper_table(score)))
    if score.target_accuracy:
        b.append(
            _h(
                3,
                f"Time to the fixed target ({100 * score.target_accuracy:g}% validation accuracy)",
            )
        )
        b.append(
            Block(
                "p",
                "Per seed, the first evaluation at or above the target. Mean ± SE only when "
                "every seed got there; otherwise 'miss (k/n hit)'. Diverged runs are misses.",
            )
        )
        b.append(Block("table", table=target_table(score)))
    if charts:
        b.append(_h(3, "Charts"))
        b.append(Block("p", BAND_NOTE + "."))
        for stem, path in charts.items():
            b.append(Block("img", text=f"{score.suite}: {stem.replace('-', ' ')}", path=path))
    missing = [c for c in ("grad_diversity-vs-epoch",) if c not in charts]
    if missing:
        b.append(Block("p", "No entry measured gradient diversity: no n·Δ̂ chart."))
    if score.not_scored:
        b.append(_h(3, "Runs not scored"))
        b.append(
            Block(
                "table",
                table=Table(
                    ["run", "entry", "seed", "status", "why"],
                    [
                        [
                            r.run_id,
                            r.entry,
                            "–" if r.seed is None else str(r.seed),
                            r.status,
                            "; ".join(r.problems) or (r.summary.get("error") or ""),
                        ]
                        for r in score.not_scored
                    ],
                    list("llrll"),
                ),
            )
        )
    if score.problems:
        b.append(_h(3, "Problems"))
        b.append(Block("list", items=list(score.problems)))
    env = _environment(score)
    if env.rows:
        b.append(_h(3, "Where the numbers come from"))
        b.append(Block("table", table=env))
    return b


# ----------------------------------------------------------------------------- renderers


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: Sequence[Block], rel_to: Path) -> str:
    out: list[str] = []
    for b in blocks:
        if b.kind.startswith("h"):
            out.append("#" * int(b.kind[1]) + " " + b.text)
        elif b.kind == "p":
            out.append(b.text)
        elif b.kind == "list":
            out.append("\n".join(f"- {i}" for i in b.items))
        elif b.kind == "table" and b.table is not None:
            t = b.table
            align = t.align or ["l"] * len(t.headers)
            lines = [
                "| " + " | ".join(_md_cell(h) for h in t.headers) + " |",
                "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|",
            ]
            lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in t.rows]
            out.append("\n".join(lines))
        elif b.kind == "img" and b.path is not None:
            out.append(f"![{b.text}]({b.path.relative_to(rel_to).as_posix()})")
        out.append("")
    return "\n".join(out)


_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
table{border-collapse:collapse;margin:0.6em 0 1.2em;font-size:0.9em}
th,td{border:1px solid #ccc;padding:0.3em 0.6em}th{background:#f3f3f3}
td.r,th.r{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;border:1px solid #eee;margin:0.4em 0}
h2{border-bottom:2px solid #ddd;padding-bottom:0.2em;margin-top:1.8em}
"""


def to_html(blocks: Sequence[Block], title: str) -> str:
    """A single self-contained page: PNGs are inlined as data URIs."""
    esc = html.escape
    out = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
        f"<style>{_CSS}</style></head><body>"
    ]
    for b in blocks:
        if b.kind.startswith("h"):
            out.append(f"<{b.kind}>{esc(b.text)}</{b.kind}>")
        elif b.kind == "p":
            out.append(f"<p>{esc(b.text)}</p>")
        elif b.kind == "list":
            out.append("<ul>" + "".join(f"<li>{esc(i)}</li>" for i in b.items) + "</ul>")
        elif b.kind == "table" and b.table is not None:
            t = b.table
            align = t.align or ["l"] * len(t.headers)
            head = "".join(
                f"<th class='{a}'>{esc(h)}</th>" for h, a in zip(t.headers, align, strict=True)
            )
            body = "".join(
                "<tr>"
                + "".join(f"<td class='{a}'>{esc(c)}</td>" for c, a in zip(r, align, strict=True))
                + "</tr>"
                for r in t.rows
            )
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif b.kind == "img" and b.path is not None:
            data = base64.b64encode(b.path.read_bytes()).decode("ascii")
            out.append(
                f"<figure><img alt='{esc(b.text)}' src='data:image/png;base64,{data}'></figure>"
            )
    out.append("</body></html>")
    return "\n".join(out)


# ----------------------------------------------------------------------------- entry point


def write_report(
    results_dirs: Sequence[Path] | Path, out_dir: Path, suite: str | None = None
) -> Path:
    """Score every suite under ``results_dirs`` and write the report into ``out_dir``.

    Writes ``report.md`` (PNGs beside it, linked), ``report.html`` (self-contained),
    ``scores.json`` (every number of the tables) and one PNG per chart and suite.
    Returns the path of report.md. Several results folders (shards) merge.
    """
    if isinstance(results_dirs, (str, Path)):
        results_dirs = [Path(results_dirs)]
    dirs = [Path(d) for d in results_dirs]
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ResultsError(f"cannot create the report folder {out_dir}: {exc.strerror or exc}") from None
    runs = load_runs(dirs, suite)
    scores = score_all(runs)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    blocks: list[Block] = [
        _h(1, "divebench report"),
        Block(
            "p",
            f"{len(runs)} run folder(s) from {', '.join(str(d) for d in dirs)}; "
            f"written {stamp}. Accuracies in percent; times in seconds of timed training "
            f"(evaluation, logging and checkpoints excluded).",
        ),
    ]
    if not scores:
        blocks.append(
            Block("p", "No run folders found" + (f" for suite {suite}" if suite else "") + ".")
        )
    for s in scores.values():
        charts = suite_charts(s, out_dir)
        blocks.extend(suite_blocks(s, charts))
    md_path = out_dir / "report.md"
    # each file replaced atomically: a failed write leaves the previous report's file
    atomic_write_text(md_path, to_markdown(blocks, out_dir))
    atomic_write_text(out_dir / "report.html", to_html(blocks, "divebench report"))
    atomic_write_text(
        out_dir / "scores.json",
        json.dumps({k: v.to_dict() for k, v in scores.items()}, indent=2, allow_nan=False) + "\n",
    )
    return md_path
