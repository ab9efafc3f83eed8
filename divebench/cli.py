"""The ``divebench`` command line (click).

User errors (bad keys, values, data, results directory, strict-mode plugin faults)
print one line ``divebench: error: ...`` and exit with code 2, before any run folder is
created. A run's own failure is recorded in its folder and the suite goes on; the exit
code is then 1.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from divebench import __version__


class UserError(click.ClickException):
    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"divebench: error: {self.format_message()}", err=True)


_USER_ERRORS: tuple[type[Exception], ...] = ()


def user_errors() -> tuple[type[Exception], ...]:
    global _USER_ERRORS
    if not _USER_ERRORS:
        from divebench.config import ConfigError
        from divebench.data.base import DataError
        from divebench.plugins import PluginError
        from divebench.results import ResultsError

        _USER_ERRORS = (ConfigError, DataError, PluginError, ResultsError)
    return _USER_ERRORS


@contextmanager
def as_user_errors() -> Iterator[None]:
    try:
        yield
    except user_errors() as exc:
        raise UserError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None


def registry() -> Any:
    from divebench import plugins

    with as_user_errors():
        reg = plugins.get_registry()
    plugins.warn(reg)
    return reg


class OneLineErrors(click.Group):
    """Click's usage errors as one ``divebench: error:`` line with exit code 2, like ours."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.pop("standalone_mode", None)
        try:
            return super().main(*args, standalone_mode=False, **kwargs)
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx is not None else "divebench"
            click.echo(f"divebench: error: {exc.format_message()} (see {where} --help)", err=True)
            sys.exit(2)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("divebench: aborted", err=True)
            sys.exit(1)


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="divebench")
def main() -> None:
    """divebench: does this batch-size policy really train faster, and what does it cost
    in accuracy? Runs batch-size policies over suites, times them honestly, and reports
    speed-ups and accuracy trade-offs (on disk and in Weights & Biases).

    Start with `divebench run` (MNIST-1D, every built-in policy, about a minute on a
    laptop), then `divebench suites` and `divebench policies`.
    """


# --------------------------------------------------------------------------------- run


@main.command(context_settings={"ignore_unknown_options": False})
@click.argument("settings", nargs=-1)
@click.option("--show-config", is_flag=True, help="Print the resolved config and where each value came from, then exit.")
@click.option("--quiet", "-q", is_flag=True, help="No per-epoch progress lines.")
@click.option("--shard", default=None, metavar="I/N", help="Run only the I-th of N slices of the entry x seed matrix (1-based).")
@click.option("--keys", "list_keys", is_flag=True, help="List every run key with its type, default and meaning, then exit.")
@click.option("--no-report", is_flag=True, help="Do not write the report at the end.")
def run(settings: tuple[str, ...], show_config: bool, quiet: bool, shard: str | None, list_keys: bool, no_report: bool) -> None:
    """Run a suite: divebench run [suite=NAME] [policy=a,b] [seeds=0,1] [KEY=VALUE ...]

    \b
    Examples:
      divebench run                                   # mnist1d, every entry, its seeds
      divebench run suite=synthetic policy=divebatch seeds=0 divebatch.delta=0.05
      divebench run suite=cifar data=fake epochs=2 subset=512 seeds=1 amp=bf16
      divebench run suite=mnist1d resume=auto         # continue after a crash

    Keys: run keys (divebench run --keys), and policy keys as <policy>.<key>=VALUE or
    <entry>.<key>=VALUE (divebench policies).
    """
    if list_keys:
        from divebench.config import KEYS, type_name

        for k, spec in KEYS.items():
            click.echo(f"{k:<16} {type_name(spec.type):<36} default {spec.default!r:<12} {spec.help}")
        return
    from divebench import engine
    from divebench.config import ConfigError, parse_overrides, show

    reg = registry()
    with as_user_errors():
        overrides = parse_overrides(settings)
        cfgs = _resolve_suites(overrides, reg)
        if show_config:
            click.echo("\n\n".join(show(c) for c in cfgs))
            return
        device = engine.resolve_device(cfgs[0]["device"])
        from divebench import distributed

        dist = distributed.setup(device)  # torchrun with WORLD_SIZE > 1; else None
        if dist is not None:
            device = dist.device
            quiet = quiet or not dist.is_main  # rank 0 speaks for the group
        from divebench.results import check_writable

        for c in cfgs:
            check_writable(Path(c["results_dir"]))
        matrix = [(c, e, s) for c in cfgs for e in c.entries for s in c["seeds"]]
        if shard:
            from divebench.sweep import shard as take_shard

            total = len(matrix)
            try:
                matrix = take_shard(matrix, shard)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
            if not matrix:
                raise ConfigError(f"--shard {shard} selects no run: the matrix has {total} run(s) "
                                  f"(entries x seeds); use at most {total} shards")
        resume = cfgs[0]["resume"]
        targets: dict[int, Path] = {}
        if resume and resume != "auto":
            entry, seed, path = engine.check_resume_target(cfgs[0], resume)
            matrix = [(cfgs[0], entry, seed)]
            targets[0] = path
        datas = {c.suite.name: engine.build_data(c, reg, device) for c in {id(m[0]): m[0] for m in matrix}.values()}

    console = engine.Console(quiet)
    sink_factory = _sink_factory(cfgs[0]["wandb"])
    results = []
    try:
        for i, (c, entry, seed) in enumerate(matrix):
            resume_dir = targets.get(i)
            label = f"[{c.suite.name} {entry.name} seed {seed}]"
            position = f"run {i + 1}/{len(matrix)}"
            if resume == "auto":
                kind, found = engine.find_resumable(c, entry, seed)
                if dist is not None:  # rank 0's view of the folders holds for every rank
                    kind, found = dist.broadcast((kind, found))
                if kind == "complete":
                    console.line(f"{label} already complete: {found} ({position})")
                    continue
                resume_dir = found
            console.line(f"{label} {'resuming' if resume_dir else 'starting'} on {device} ({position})")
            with as_user_errors():
                result = engine.run_one(c, reg, entry, seed, datas[c.suite.name], device, console, resume_dir, sink_factory)
            results.append(result)
            console.finished(label, result.summary, position)
    except KeyboardInterrupt as exc:
        if dist is None or dist.is_main:
            click.echo(f"divebench: interrupted: {exc}; continue with the same command and resume=auto", err=True)
        distributed.shutdown(clean=False)
        sys.exit(128 + int(getattr(exc, "signum", 2)))  # 143 for SIGTERM, 130 for SIGINT (shell convention)
    distributed.shutdown()
    if not no_report and not shard and (dist is None or dist.is_main):
        with as_user_errors():
            _final_report(cfgs, quiet)
    if any(r.status == "failed" for r in results):
        sys.exit(1)


def _resolve_suites(overrides: dict[str, str], reg: Any) -> list[Any]:
    """The resolved config of ``suite=`` (of each suite a composite one runs)."""
    from divebench.config import ConfigError, get_suite, resolve

    top = get_suite(overrides.get("suite", "mnist1d"), reg)
    for child in top.includes:
        if child not in reg.suites:
            raise ConfigError(f"suite {top.name} includes unknown suite '{child}'")
    return [resolve(overrides, reg, suite_name=n) for n in (top.includes or [top.name])]


@main.command("check-stats", context_settings={"ignore_unknown_options": False})
@click.argument("settings", nargs=-1)
def check_stats(settings: tuple[str, ...]) -> None:
    """Check the exact statistics on a suite's model: divebench check-stats suite=NAME [model=M] [batches=K]

    Runs the exact provider (what DiveBatch and every policy declaring
    per-sample statistics use) on K batches of the suite's training data next to a
    float64 per-sample reference, and prints Σ_i‖g_i‖² per parameter and the relative
    error. Exit 0: every parameter agrees; 1: one disagrees, or the provider refuses the
    model (the line names the parameter or layer); 2: bad input.

    The provider runs in float64 unless dtype=float32 is given, so that the check sees
    the algorithm, not float32 rounding.

    \b
    Keys: batches=K (default 2), tolerance=T (relative; default 1e-6 in float64,
    1e-3 in float32), bn=contribution|paper (BatchNorm definition), and any run key
    (model=, batch_size=, dtype=, data=fake ...).
    Examples:
      divebench check-stats suite=mnist1d
      divebench check-stats suite=cifar10 data=fake batch_size=8 batches=1
      divebench check-stats suite=synthetic model=my_transformer batches=4
    """
    from divebench import checkstats, engine
    from divebench.config import ConfigError, parse_overrides

    reg = registry()
    with as_user_errors():
        overrides = parse_overrides(settings)
        batches, tolerance, bn = checkstats.parse_options(overrides)
        for key in ("policy", "resume"):
            if key in overrides:
                raise ConfigError(f"{key}= has no meaning for check-stats (it checks the model, not a policy)")
        cfgs = _resolve_suites(overrides, reg)
        device = engine.resolve_device(cfgs[0]["device"])
    failed = False
    for cfg in cfgs:
        with as_user_errors():
            out = checkstats.check(cfg, reg, device, batches, tolerance, bn,
                                   log=lambda s: click.echo(s, err=True))
        click.echo(checkstats.format_outcome(out))
        failed |= not out.passed
    if failed:
        sys.exit(1)


def _sink_factory(mode: str) -> Callable[[], Any] | None:
    if mode == "off":
        return None
    try:
        from divebench.report.wandb_sink import WandbSink
    except Exception as exc:  # the sink must never stop a run
        click.echo(f"divebench: warning: W&B sink unavailable ({type(exc).__name__}: {exc}); results are on disk", err=True)
        return None
    return WandbSink


def _final_report(cfgs: list[Any], quiet: bool) -> None:
    from divebench import scoring
    from divebench.report import write_report

    dirs = sorted({Path(c["results_dir"]) for c in cfgs})
    for c in cfgs:
        runs = scoring.load_runs(dirs, c.suite.name)
        score = scoring.score_suite(runs, c["baseline"] or None, c["target_accuracy"] or None)
        click.echo(f"\n== {c.suite.name} ==")
        click.echo(_format(score))
    out = dirs[0] / "report"
    from divebench.results import ResultsError

    try:
        path = write_report(dirs, out, None if len(cfgs) > 1 else cfgs[0].suite.name)
    except ResultsError as exc:
        where = ",".join(map(str, dirs))
        raise ResultsError(f"{str(exc).split('; free some space')[0]}; the runs' results are complete: "
                           f"write the report again with divebench report results_dir={where}") from None
    click.echo(f"\nreport: {path}")


def _format(score: Any) -> str:
    from divebench.report import format_table

    return str(format_table(score))


# ------------------------------------------------------------------------ report, sweep


@main.command()
@click.argument("settings", nargs=-1)
@click.option("--wandb", "to_wandb", is_flag=True, help="Also build a W&B Report (needs W&B online and synced runs).")
def report(settings: tuple[str, ...], to_wandb: bool) -> None:
    """Write the Markdown/HTML/PNG report of result folders.

    \b
    divebench report [suite=NAME] [results_dir=PATH[,PATH...]] [out=PATH] [--wandb [project=P] [entity=E]]
    Several results_dir paths (e.g. the folders of --shard slices) are merged.
    """
    from divebench import scoring
    from divebench.config import ConfigError, parse_overrides, suggest
    from divebench.report import write_report

    with as_user_errors():
        opts = parse_overrides(settings)
        allowed = {"suite", "results_dir", "out", "project", "entity"}
        for k in opts:
            if k not in allowed:
                raise ConfigError(f"unknown key '{k}' for report{suggest(k, allowed)} (keys: {', '.join(sorted(allowed))})")
        dirs = [Path(d) for d in opts.get("results_dir", "results").split(",") if d]
        if not dirs:
            raise ConfigError("results_dir= is empty: give one or more folders, comma-separated")
        for d in dirs:
            if not d.is_dir():
                raise ConfigError(f"results_dir={d} does not exist; point results_dir= at the folder divebench run wrote")
        suite = opts.get("suite") or None
        runs = scoring.load_runs(dirs, suite)
        if not runs:
            where = f" of suite {suite}" if suite else ""
            raise ConfigError(f"no runs{where} under {', '.join(map(str, dirs))}; run divebench run first")
        out = Path(opts.get("out") or dirs[0] / "report")
        from divebench.results import ResultsError

        try:
            path = write_report(dirs, out, suite)
        except ResultsError as exc:  # no run folder is touched by a report: only retry it
            raise ResultsError(f"{str(exc).split('; free some space')[0]}; free some space or choose "
                               "out=PATH, then run the same command again") from None
        except OSError as exc:
            raise ConfigError(f"out={out}: cannot write the report there ({exc.strerror or exc}); choose a folder with out=PATH") from None
        for name, score in scoring.score_all(runs).items():
            click.echo(f"\n== {name} ==")
            click.echo(_format(score))
        click.echo(f"\nreport: {path}")
        if to_wandb:
            from divebench.report.wandb_report import ReportError, publish_report

            for name in sorted({r.suite for r in runs}):
                entries = sorted({r.entry for r in runs if r.suite == name})
                try:
                    url = publish_report(name, entries, opts.get("project", "divebench"), opts.get("entity"), runs=runs)
                except ReportError as exc:
                    raise ConfigError(str(exc)) from None
                click.echo(f"W&B report ({name}): {url}")


@main.command()
@click.argument("settings", nargs=-1)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write the YAML here instead of stdout.")
def sweep(settings: tuple[str, ...], out: Path | None) -> None:
    """Write a W&B sweep file over a suite's policies, seeds and grid keys.

    \b
    divebench sweep suite=mnist1d policy=sgd-small,divebatch seeds=0,1,2 divebatch.delta=0.05,0.1,0.2
    List keys take one list as `divebench run` does; alternatives are separated by ';':
    divebench sweep suite=cifar100 lr_milestones='60,120,160;30,60,80'.
    then: wandb sweep FILE; wandb agent ID. Each agent run is `divebench run key=value ...`.
    Without W&B: divebench run ... --shard i/n splits the same matrix across machines.
    """
    from divebench.config import parse_overrides, resolve
    from divebench.sweep import sweep_yaml

    reg = registry()
    with as_user_errors():
        opts = parse_overrides(settings)
        base = {k: v for k, v in opts.items() if k in ("suite", "policy", "seeds")}
        suite_cfg = resolve(base, reg)
        # A key's values are split as `divebench run` reads one value: list keys
        # (lr_milestones=3,6) are one list, alternatives separated by ';' (3,6;60,120);
        # other keys take comma-separated alternatives. One value is a fixed setting.
        grid: dict[str, list[str]] = {}
        for k, v in opts.items():
            if k in ("suite", "policy", "seeds", "wandb_project"):
                continue
            grid[k] = [x for x in v.split(";" if _is_list_key(k, suite_cfg, reg) else ",")]
        first = {k: vals[0] for k, vals in grid.items()}
        # every value must resolve beside the first value of every other key
        cfg = resolve(base | first, reg)
        for k, vals in grid.items():
            for val in vals[1:]:
                resolve(base | first | {k: val}, reg)
        text = sweep_yaml(cfg.suite.name, [e.name for e in cfg.entries], cfg["seeds"], grid, opts.get("wandb_project", cfg["wandb_project"]))
    if out:
        try:
            out.write_text(text)
        except OSError as exc:
            raise UserError(f"--out {out}: cannot write ({exc.strerror or exc})") from None
        click.echo(f"sweep file: {out} (wandb sweep {out})")
    else:
        click.echo(text, nl=False)


def _is_list_key(key: str, cfg: Any, reg: Any) -> bool:
    """Whether ``key`` (a run key or <policy|entry>.<key>) holds a list."""
    import typing

    from divebench.config import KEYS, policy_fields

    if "." not in key:
        spec = KEYS.get(key)
        return spec is not None and typing.get_origin(spec.type) is list
    prefix, name = key.split(".", 1)
    policy = next((e.policy for e in cfg.entries if e.name == prefix), prefix)
    if policy not in reg.policies:
        return False
    tp = policy_fields(reg.policies[policy][0]).get(name, (None, None))[0]
    return typing.get_origin(tp) is list


# ------------------------------------------------------------------- registry listings


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plugins(as_json: bool) -> None:
    """List loaded plugins: name, version, source, status."""
    reg = registry()
    rows = [vars(p) for p in reg.plugins]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'name':<20} {'version':<10} {'source':<32} status")
    for p in reg.plugins:
        click.echo(f"{p.name:<20} {p.version:<10} {p.source:<32} {p.status}")


@main.command()
@click.argument("pattern", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def policies(pattern: str | None, as_json: bool) -> None:
    """List policies with their description and config keys (defaults)."""
    from divebench.config import policy_fields, type_name

    reg = registry()
    out = []
    for name, (cls, plugin) in sorted(reg.policies.items()):
        if pattern and pattern not in name:
            continue
        keys = {k: {"type": type_name(tp), "default": d} for k, (tp, d) in policy_fields(cls).items()}
        out.append({"name": name, "plugin": plugin, "description": cls.description,
                    "stats": cls.stats, "keys": keys})
    if as_json:
        click.echo(json.dumps(out, indent=2, default=str))
        return
    for p in out:
        click.echo(f"{p['name']}  ({p['plugin']})  {p['description']}")
        for k, meta in p["keys"].items():
            click.echo(f"    {p['name']}.{k} = {meta['default']!r}  [{meta['type']}]")


@main.command()
@click.argument("pattern", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def suites(pattern: str | None, as_json: bool) -> None:
    """List suites with their description, entries and defaults."""
    from divebench.config import load_suite

    reg = registry()
    out = []
    with as_user_errors():
        for name, (path, plugin) in sorted(reg.suites.items()):
            if pattern and pattern not in name:
                continue
            s = load_suite(Path(path))
            out.append({"name": name, "plugin": plugin, "description": s.description,
                        "includes": s.includes,
                        "entries": {e.name: {"policy": e.policy, **e.params} for e in s.entries.values()},
                        "defaults": s.defaults})
    if as_json:
        click.echo(json.dumps(out, indent=2, default=str))
        return
    for s in out:
        click.echo(f"{s['name']}  ({s['plugin']})  {s['description']}")
        if s["includes"]:
            click.echo(f"    runs suites: {', '.join(s['includes'])}")
        for e, spec in s["entries"].items():
            params = " ".join(f"{k}={v}" for k, v in spec.items() if k != "policy")
            click.echo(f"    entry {e}: {spec['policy']} {params}".rstrip())
        if s["defaults"]:
            click.echo("    defaults: " + " ".join(f"{k}={v}" for k, v in s["defaults"].items()))


# ------------------------------------------------------------ regression checks (CI)


@main.command()
@click.argument("base", type=click.Path(path_type=Path))
@click.argument("new", type=click.Path(path_type=Path))
@click.option("--suite", default=None, help="Compare only this suite (default: every suite in both).")
@click.option("--fail-on", default="time:5%,acc:0.5", show_default=True, metavar="METRIC:LIMIT,...",
              help="time:X% (training time, time to target), acc:X (final accuracy drop, points), steps:X%, samples:X%.")
def compare(base: Path, new: Path, suite: str | None, fail_on: str) -> None:
    """Compare two result sets of a suite; exit 1 naming each regression, 0 if none.

    \b
    Example (a CI job):
      divebench compare results-main results-branch --suite mnist1d --fail-on time:5%,acc:0.5
    """
    from divebench.compare import CompareError, compare_results, format_report

    try:
        report = compare_results(base, new, suite, fail_on)
    except CompareError as exc:
        raise UserError(str(exc)) from None
    click.echo(format_report(report))
    sys.exit(1 if report.regressions else 0)


def bench_dir() -> Path:
    """bench/ of the source checkout this package was imported from."""
    return Path(__file__).resolve().parent.parent / "bench"


@main.command(context_settings={"ignore_unknown_options": True})
@click.option("--update-golden", is_flag=True, help="Rewrite bench/golden/*.json from this code.")
@click.argument("pytest_args", nargs=-1, type=click.UNPROCESSED)
def bench(update_golden: bool, pytest_args: tuple[str, ...]) -> None:
    """Run the regression benchmarks: same-run ratio gates and golden results.

    Needs a source checkout (pip install -e .); extra arguments go to pytest.
    """
    import subprocess

    folder = bench_dir()
    if not (folder / "conftest.py").is_file():
        raise UserError(f"no bench/ folder at {folder}: the benchmarks ship with the source checkout (git clone, then pip install -e .)")
    cmd = [sys.executable, "-m", "pytest", str(folder), "-p", "no:cacheprovider", *pytest_args]
    if update_golden:
        cmd.append("--update-golden")
    sys.exit(subprocess.call(cmd, cwd=folder.parent))


if __name__ == "__main__":  # pragma: no cover
    main()
