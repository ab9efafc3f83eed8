"""A W&B report of one suite, built with wandb-workspaces.

``build_report_spec`` makes the report object without touching the network (so it is
testable offline); ``publish_report`` saves it, which needs the runs on the W&B server:
runs logged offline must be uploaded first with the ``wandb sync`` command each run's
summary.json records (``sync_commands`` lists them).

The panels mirror the local report: validation accuracy against epochs, training time
and samples seen; batch size, gradient diversity (n·Δ̂) and learning rate against
epochs. Runs are filtered to W&B group = suite and grouped by the ``entry`` config key
(one line per entry, the mean over seeds with a min–max band, as in the local charts).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from divebench.report.wandb_sink import resolve_mode
from divebench.scoring import RunRecord

# (title, x metric, y metric, log y)
PANELS: list[tuple[str, str, str, bool]] = [
    ("Validation accuracy vs epoch", "epoch", "val_acc", False),
    ("Validation accuracy vs training time (s)", "train_time_s", "val_acc", False),
    ("Validation accuracy vs samples seen", "samples_seen", "val_acc", False),
    ("Batch size vs epoch", "epoch", "batch_size", True),
    ("Gradient diversity n·Δ̂ vs epoch (measured epochs)", "epoch", "n_grad_diversity", True),
    ("Learning rate vs epoch", "epoch", "lr", False),
]


class ReportError(Exception):
    """The W&B report cannot be published; the message says what to do (one line)."""


def build_report_spec(suite: str, entries: Sequence[str], project: str, entity: str | None) -> Any:
    """The W&B report of ``suite`` (a ``wandb_workspaces.reports.v2.Report``), not saved.

    ``entity`` None leaves it empty: ``publish_report`` fills in the user's default
    entity; building never contacts the server.
    """
    import wandb_workspaces.reports.v2 as wr
    from wandb_workspaces import expr

    filters = [expr.Metric("Group") == suite]
    if entries:
        filters.append(expr.Config("entry").isin(list(entries)))
    runset = wr.Runset(
        entity=entity or "",
        project=project,
        name=suite,
        filters=expr.And(*filters),
        groupby=["config.entry"],
    )
    panels = []
    for i, (title, x, y, log_y) in enumerate(PANELS):
        panels.append(
            wr.LinePlot(
                title=title,
                x=x,
                y=[y],
                log_y=log_y or None,
                title_x=x,
                title_y=y,
                groupby_aggfunc="mean",
                groupby_rangefunc="minmax",
                layout=wr.Layout(x=(i % 2) * 12, y=(i // 2) * 8, w=12, h=8),
            )
        )
    intro = (
        f"Suite **{suite}**; entries: {', '.join(entries) or 'all'}. One line per entry: the mean "
        "over seeds, band = min–max. Training time excludes evaluation. The numbers of record "
        "(paper metric, time to target, speed-ups) are in the local report (`divebench report`), "
        "computed from the run folders."
    )
    return wr.Report(
        project=project,
        entity=entity or "",
        title=f"divebench: {suite}",
        description=f"Batch-size policies on {suite}",
        blocks=[wr.MarkdownBlock(text=intro), wr.PanelGrid(runsets=[runset], panels=panels)],
    )


def sync_commands(runs: Sequence[RunRecord]) -> list[str]:
    """The ``wandb sync`` commands of runs that logged offline and are not uploaded yet
    (``wandb sync`` leaves a ``*.wandb.synced`` marker beside the run file)."""
    out = []
    for r in runs:
        info = r.summary.get("wandb") or {}
        if (
            not isinstance(info, dict)
            or info.get("mode") != "offline"
            or not info.get("sync_command")
        ):
            continue
        sync_dir = info.get("sync_dir") or str(info["sync_command"]).removeprefix("wandb sync ")
        if list(Path(sync_dir).glob("*.wandb.synced")):
            continue
        out.append(str(info["sync_command"]))
    return out


def _listed(commands: list[str], limit: int = 3) -> str:
    more = f" (and {len(commands) - limit} more)" if len(commands) > limit else ""
    return "; ".join(commands[:limit]) + more


def publish_report(
    suite: str,
    entries: Sequence[str],
    project: str,
    entity: str | None = None,
    mode: str = "auto",
    runs: Sequence[RunRecord] = (),
) -> str:
    """Save the suite's report to W&B and return its URL.

    Raises ReportError when not online (no credentials, ``mode`` offline/off) or when
    runs of the suite logged offline are not uploaded yet: the message says what to run.
    """
    pending = sync_commands([r for r in runs if r.suite == suite])
    if resolve_mode(mode) != "online":
        hint = f"; then upload the offline runs: {_listed(pending)}" if pending else ""
        raise ReportError(f"a W&B report needs W&B online: log in with `wandb login`{hint}")
    if pending:
        raise ReportError(
            f"{len(pending)} run(s) of {suite} were logged offline; upload them "
            f"first: {_listed(pending)}"
        )
    try:
        import wandb

        entity = entity or wandb.Api().default_entity
        report = build_report_spec(suite, entries, project, entity)
        report.save()
        return str(report.url)
    except ReportError:
        raise
    except Exception as exc:  # network, auth, unknown project: say it in one line
        raise ReportError(
            f"W&B report for {suite} not saved ({type(exc).__name__}: {exc})"
        ) from None
