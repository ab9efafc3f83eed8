"""The engine: turns a resolved suite configuration into runs.

For every (entry, seed) of the suite's matrix it builds the model, optimiser, policy,
the statistics provider (only when the policy declares it needs one), the run folder
and the sinks, then hands them to :func:`divebench.loop.train`. A run that diverges or
whose plugin fails mid-run is recorded (status ``diverged`` / ``failed``) and the suite
goes on; a signal stops the suite after writing a checkpoint (status ``interrupted``).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from divebench import checkpoint as ckpt
from divebench import distributed
from divebench.clock import Clock
from divebench.config import (
    ConfigError,
    Entry,
    RunConfig,
    lr_schedule,
    make_policy_config,
    suite_context,
    validate,
)
from divebench.data.base import DataBundle
from divebench.loop import Diverged, Interrupted, Progress, Setup, train
from divebench.policy import InvalidDecision
from divebench.results import (
    RankFolder,
    ResultsError,
    RunFolder,
    environment,
    lock_run,
    new_run_dir,
    run_is_held,
)

# Keys that do not change what a run computes: ignored when matching a run to resume.
NON_RESULT_KEYS = {"resume", "keep_checkpoint", "results_dir", "wandb", "wandb_project", "policy", "seeds", "device", "threads"}
# Result keys added after run folders already existed: a config.yaml without the key
# was run with this value.
ADDED_KEYS = {"dtype": "float32"}


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but CUDA is not available on this machine; use device=auto or device=cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_model(cfg: RunConfig, registry: Any, data: DataBundle, device: torch.device) -> nn.Module:
    """The run's model (its builder, on ``device`` in the run's dtype); a builder that
    cannot take this dataset is a :class:`ConfigError` naming both."""
    v = cfg.values
    try:
        model: nn.Module = registry.models[v["model"]][0](data.num_classes, data.input_shape, dict(v))
        return model.to(device, getattr(torch, v["dtype"]))
    except (ValueError, TypeError, RuntimeError) as exc:
        raise ConfigError(
            f"model={v['model']} cannot be built for dataset={v['dataset']} "
            f"(input {data.input_shape}, {data.num_classes} classes): {str(exc).splitlines()[0]}"
        ) from None


def build_data(cfg: RunConfig, registry: Any, device: torch.device) -> DataBundle:
    builder = registry.datasets[cfg["dataset"]][0]
    data: DataBundle = builder(dict(cfg.values), device, 0)
    subset = int(cfg["subset"] or 0)
    if subset > data.train_size:
        raise ConfigError(f"subset={subset} is larger than the training set of dataset={cfg['dataset']} "
                          f"({data.train_size} samples): choose subset <= {data.train_size} (0 = all)")
    validate(cfg, registry, dataset_size=data.train_size)
    dtype = getattr(torch, cfg["dtype"])
    for name in ("x_train", "x_val", "x_test"):  # float features once; raw images stay uint8
        x = getattr(data, name)
        if x is not None and x.is_floating_point() and x.dtype != dtype:
            setattr(data, name, x.to(dtype))
    return data


@dataclass
class RunResult:
    run_id: str
    path: Path
    entry: str
    seed: int
    status: str
    summary: dict[str, Any]


class Console:
    """Progress on stderr: a line when each run starts and ends (and for events such as
    out-of-memory retries) wherever stderr goes, so a log file or CI job shows how far a
    suite has got; on a terminal also one line per epoch. ``quiet`` silences all of it."""

    def __init__(self, quiet: bool) -> None:
        self.enabled = not quiet
        self.per_epoch = not quiet and sys.stderr.isatty()

    def epoch(self, label: str, epochs: int, row: dict[str, Any]) -> None:
        if self.per_epoch:
            print(
                f"  {label} epoch {row['epoch']:>3}/{epochs}  B={row['batch_size']:<5} lr={row['lr']:.4g}"
                f"  loss={row['train_loss']:.4f}  val_acc={100 * row['val_acc']:.2f}%"
                f"  train {row['train_time_s']:.1f}s  wall {row['wall_time_s']:.1f}s",
                file=sys.stderr, flush=True,
            )

    def line(self, text: str) -> None:
        if self.enabled:
            print(text, file=sys.stderr, flush=True)

    def finished(self, label: str, summary: dict[str, Any], position: str) -> None:
        acc = summary.get("final_val_acc")
        self.line(
            f"{label} {summary.get('status')}: {summary.get('epochs_completed', 0)} epochs"
            + (f", final val acc {100 * acc:.2f}%" if acc is not None else "")
            + f", train {summary.get('train_time_s', 0.0):.1f}s, wall {summary.get('wall_time_s', 0.0):.1f}s ({position})"
        )


def run_config_dict(cfg: RunConfig, entry: Entry, seed: int) -> dict[str, Any]:
    return cfg.to_dict(entry, seed)  # "policy" stays the run's entry list: report order


def comparable(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in (ADDED_KEYS | config).items() if k not in NON_RESULT_KEYS}


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN has bf16 kernels for this CPU (AVX512-BF16 or AMX)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _use_channels_last(
    input_shape: tuple[int, ...], device: torch.device, prior_env: dict[str, Any] | None
) -> bool:
    """Whether the run's model trains in channels_last.

    Image models (3-D inputs) do, on every device: on CUDA for cudnn's NHWC kernels, on
    CPU for oneDNN's (the CIFAR ResNet-18's step took 0.84-0.95x the time of the NCHW step
    on 2 CPU cores; README "Smoke runs and speed on CPU", bench/test_bench_layout.py).
    Numerics are the same up to float summation order (tests/test_resnet.py). A resumed
    run keeps the layout it started with (``prior_env``: its env.json), so it replays as
    it would have gone on; runs from before env.json recorded it used channels_last on
    CUDA only.
    """
    if len(input_shape) != 3:
        return False
    if prior_env is not None:
        recorded = prior_env.get("memory_format")
        if recorded is not None:
            return bool(recorded == "channels_last")
        return device.type == "cuda"
    return True


def run_one(
    cfg: RunConfig, registry: Any, entry: Entry, seed: int, data: DataBundle, device: torch.device,
    console: Console, resume_dir: Path | None = None, sink_factory: Callable[[], Any] | None = None,
) -> RunResult:
    """:func:`_run_one` holding the run folder's writer lock (:func:`results.lock_run`)
    from the moment the folder is chosen until the run's files are final."""
    locks: list[int] = []
    try:
        return _run_one(cfg, registry, entry, seed, data, device, console, resume_dir, sink_factory, locks)
    finally:
        for fd in locks:
            os.close(fd)


def _run_one(
    cfg: RunConfig, registry: Any, entry: Entry, seed: int, data: DataBundle, device: torch.device,
    console: Console, resume_dir: Path | None, sink_factory: Callable[[], Any] | None, locks: list[int],
) -> RunResult:
    """Train one (entry, seed) and write its run folder; never raises for a run's own
    failure (it is recorded), only for signals and user errors found before it starts."""
    v = cfg.values
    if v["threads"] > 0:
        torch.set_num_threads(v["threads"])
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # autotune: its warm-up is counted as training time
    clock = Clock(device)
    dist = distributed.current()  # None unless torchrun started several processes
    main = dist is None or dist.is_main
    with clock.region("other"):
        policy_cls, plugin = registry.policies[entry.policy]
        ctx = suite_context(cfg, data.train_size, seed)
        torch.manual_seed(seed)
        model = build_model(cfg, registry, data, device)
        prior_env = read_env(resume_dir) if resume_dir is not None else None
        channels_last = _use_channels_last(data.input_shape, device, prior_env)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        policy = policy_cls(make_policy_config(entry, registry), ctx)
        provider = None
        setup_error: tuple[str, str] | None = None  # (one line, traceback): fails this run only
        if policy_cls.stats is not None:
            from divebench.stats import provider_from_options

            try:
                if policy_cls.stats_scope not in ("epoch", "step"):
                    raise ValueError(f"stats_scope={policy_cls.stats_scope!r}; expected 'epoch' or 'step'")
                if policy_cls.stats_scope == "step" and not policy_cls.per_step:
                    raise ValueError("stats_scope='step' needs per_step = True (step statistics "
                                     "arrive at decide_step)")
                provider = provider_from_options(policy.stats_options(), policy_cls.stats_scope)
                provider.set_dist(dist)
            except Exception as exc:  # the plugin's options: its own run fails, the suite goes on
                setup_error = (f"policy '{entry.policy}' (plugin '{plugin}'): {str(exc).splitlines()[0]}",
                               traceback.format_exc())
        module = provider.wrap(model) if provider is not None else model
        if v["compile"]:
            module = torch.compile(module)  # warm-up is counted in train time (AlgoPerf rule)
        if dist is not None:
            module = distributed.wrap(module, dist)
        optimizer = torch.optim.SGD(
            model.parameters(), lr=v["lr"], momentum=v["momentum"],
            weight_decay=v["weight_decay"], nesterov=v["nesterov"],
        )
        config = run_config_dict(cfg, entry, seed)
        if dist is not None and not main:  # rank 0 is the one writer: follow it
            run_id, path_s, refusal = dist.broadcast(None)
            if refusal is not None:
                raise ConfigError(refusal)
            path = Path(path_s)
            folder = RankFolder(path, run_id)
            env = {}
            state = None
            if resume_dir is not None and (path / ckpt.FILENAME).exists():
                state = ckpt.load(path / ckpt.FILENAME, device)
        elif resume_dir is None:
            try:
                run_id, path = new_run_dir(Path(v["results_dir"]), cfg.suite.name, entry.name, seed)
            except ResultsError as exc:
                if dist is not None:
                    dist.broadcast((None, None, str(exc)))
                raise
            locks.append(lock_run(path))
            folder = RunFolder(path, run_id)
            folder.write_config(config)
            env = environment(device, registry.plugin_versions()) | {
                "data": data.info, "memory_format": "channels_last" if channels_last else "contiguous",
            }
            folder.write_env(env)
            state = None
            if dist is not None:
                dist.broadcast((run_id, str(path), None))
        else:
            try:
                path, run_id, state, env, folder = _open_for_resume(resume_dir, config, device, locks, prior_env)
            except (ConfigError, ResultsError) as exc:
                if dist is not None:
                    dist.broadcast((None, None, str(exc)))
                raise
            if dist is not None:
                dist.broadcast((run_id, str(path), None))
        setup = Setup(
            model=module, optimizer=optimizer, policy=policy, plugin=plugin, provider=provider,
            data=data, device=device, epochs=v["epochs"], base_lr=lr_schedule(v),
            max_micro_batch=v["max_micro_batch"], eval_batch_size=v["eval_batch_size"], seed=seed,
            amp=v["amp"], channels_last=channels_last, dtype=getattr(torch, v["dtype"]),
            log=lambda msg: (folder.log(msg), console.line(f"  {msg}")), dist=dist,
        )
        cpus = os.cpu_count() or 1
        if v["threads"] > cpus:
            setup.log(f"threads={v['threads']} is more than this machine's {cpus} CPUs: torch's threads "
                      f"will compete for them and train far slower; use threads<={cpus} (0 = torch's default)")
        if v["amp"] == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
            setup.log("amp=bf16: this CPU has no native bf16 (AVX512-BF16/AMX), so bf16 runs slower than amp=off here")
        progress, epoch_state = (None, None)
        if state is not None:
            progress, epoch_state = ckpt.restore(state, setup, clock)
            folder.truncate_metrics(progress.epoch)
            folder.log(f"resumed from epoch {progress.epoch}" + (" (mid-epoch)" if epoch_state else ""))
        sink = sink_factory() if sink_factory is not None and main else None
        if sink is not None:
            sink.start(path, config, env, v["wandb"], v["wandb_project"], cfg.suite.name,
                       entry.policy, f"{entry.name}-{seed}", run_id, resume=state is not None)
        summary: dict[str, Any] = base_summary(folder, cfg, entry, seed)
        folder.write_summary(summary | {"status": "running"})

    label = f"[{cfg.suite.name} {entry.name} seed {seed}]"

    def on_epoch(row: dict[str, Any]) -> None:
        steps = row.pop("steps", None)
        if steps:
            folder.append_steps(steps)  # before the epoch's row: a row implies its steps
        folder.append_metrics(row)
        if sink is not None:
            sink.log_epoch(row)
        console.epoch(label, v["epochs"], row)

    def save(p: Progress, sampler: Any, aug_gen: torch.Generator, epoch_state: dict[str, Any] | None) -> None:
        if main:  # one writer
            ckpt.save(path / ckpt.FILENAME, setup, p, clock, epoch_state, folder.state())

    status, error = "complete", None
    interrupted_by = 2  # SIGINT unless the loop says otherwise
    if setup_error is not None:
        status, error = "failed", setup_error[0]
        folder.log(setup_error[1])
    try:
        if setup_error is None:
            train(setup, clock, on_epoch, save, progress, epoch_state)
    except Diverged as exc:
        status, error = "diverged", str(exc)
    except Interrupted as exc:
        status, error = "interrupted", str(exc)
        interrupted_by = exc.signum
    except ResultsError:
        raise  # the results directory failed (disk full, removed): a user error, not the run's
    except InvalidDecision as exc:
        status, error = "failed", str(exc)
        folder.log(traceback.format_exc())
    except Exception as exc:  # a fault inside a policy/plugin/model: recorded, suite goes on
        if dist is not None and distributed.is_group_failure(exc):
            # another rank died (or the network broke): resumable, like a signal
            status = "interrupted"
            error = (f"the data-parallel group lost a rank ({str(exc).splitlines()[0][:160]}); torchrun's "
                     "report names it; continue with the same command and resume=auto")
            interrupted_by = 15
        else:
            status, error = "failed", f"{type(exc).__name__}: {exc}"
        folder.log(traceback.format_exc())
    except (SystemExit, KeyboardInterrupt) as exc:
        # Raised by the run's own code (a policy calling sys.exit, raising
        # KeyboardInterrupt): real SIGINT/SIGTERM only set a flag in the loop (Interrupted).
        status = "failed"
        error = f"{type(exc).__name__}({exc}) raised by the run's code (policy, plugin or model); not a signal"
        folder.log(traceback.format_exc())
    with clock.region("other"):
        summary = finish_summary(folder, summary, status, error, clock, v["epochs"])
        if sink is not None:
            summary["wandb"] = sink.finish(summary)
        folder.write_summary(summary)
        if status == "complete" and not v["keep_checkpoint"] and main:
            # only after the summary says complete: a crash in between leaves a
            # resumable run, never a finished one without its final state
            (path / ckpt.FILENAME).unlink(missing_ok=True)
    if status in ("failed", "diverged") and main:
        print(f"divebench: {label} {status}: {error}", file=sys.stderr)
    if status == "interrupted":
        stop = KeyboardInterrupt(error)
        stop.signum = interrupted_by  # type: ignore[attr-defined]  # the exit code is 128 + it
        raise stop
    return RunResult(run_id, path, entry.name, seed, status, summary)


def _epoch_span(rows: list[dict[str, Any]]) -> str:
    epochs = [r.get("epoch") for r in rows]
    return "none" if not epochs else f"{len(epochs)} rows ({epochs[0]}..{epochs[-1]})"


def _open_for_resume(
    path: Path, config: dict[str, Any], device: torch.device, locks: list[int], prior_env: dict[str, Any] | None,
) -> tuple[Path, str, dict[str, Any] | None, dict[str, Any], RunFolder]:
    """Take the run's lock and check the folder against its checkpoint (README,
    "What a resume checks"); returns (path, run id, checkpoint state or None, env, folder)."""
    run_id = path.name
    locks.append(lock_run(path))  # before anything is read or truncated
    for tmp in path.glob(".*.tmp"):  # a killed writer's half-written files (we hold the lock)
        tmp.unlink(missing_ok=True)
    folder = RunFolder(path, run_id)
    env = prior_env or {}
    if not (path / ckpt.FILENAME).exists():
        # resume=auto of a run stopped before its first checkpoint (killed, disk full):
        # nothing was trained, so it starts over in its own folder
        folder.log("no checkpoint was written before the run stopped: starting it over in this folder")
        folder.write_config(config)
        return path, run_id, None, env, folder
    try:
        state = ckpt.load(path / ckpt.FILENAME, device)
    except Exception as exc:  # truncated, empty or foreign: nothing can be trusted
        raise ConfigError(f"resume: {path / ckpt.FILENAME} cannot be read ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else 'empty or truncated'}); "
                          "start the run again without resume=") from None
    recorded = state.get("folder") if isinstance(state, dict) else None
    if recorded is not None:  # checkpoints before 2026-12-06 recorded nothing to check
        why = folder.check_against(recorded)
        if why is not None:
            raise ConfigError(f"resume: run {run_id} cannot be continued: {why}")
    return path, run_id, state, env, folder


def read_env(path: Path) -> dict[str, Any]:
    """The env.json of an existing run folder ({} if it is unreadable)."""
    try:
        return dict(json.loads((path / "env.json").read_text()))
    except (OSError, ValueError):
        return {}


def base_summary(folder: RunFolder, cfg: RunConfig, entry: Entry, seed: int) -> dict[str, Any]:
    return {
        "run_id": folder.run_id, "suite": cfg.suite.name, "entry": entry.name,
        "policy": entry.policy, "seed": seed,
    }


def finish_summary(folder: RunFolder, summary: dict[str, Any], status: str, error: str | None, clock: Clock,
                   epochs: int | None = None) -> dict[str, Any]:
    rows = folder.rows
    if status == "complete" and epochs is not None and [r.get("epoch") for r in rows] != list(range(1, epochs + 1)):
        # never 'complete' over missing or repeated epochs
        status, error = "failed", f"metrics.jsonl holds epochs {_epoch_span(rows)}, not 1..{epochs}"
    accs = [r["val_acc"] for r in rows]
    last = rows[-1] if rows else {}
    return summary | {
        "status": status, "error": error, "epochs_completed": len(rows),
        "final_val_acc": accs[-1] if accs else None, "best_val_acc": max(accs) if accs else None,
        "train_time_s": last.get("train_time_s", clock.train_time_s),
        "wall_time_s": clock.wall_time_s, "steps": last.get("step", 0),
        "samples_seen": last.get("samples_seen", 0),
        "final_batch_size": last.get("batch_size"),
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def find_resumable(cfg: RunConfig, entry: Entry, seed: int) -> tuple[str, Path | None]:
    """For resume=auto: ('complete', path) if this run already finished, ('resume', path)
    for the newest unfinished run with the same config, else ('new', None)."""
    root = Path(cfg["results_dir"]) / cfg.suite.name
    want = comparable(run_config_dict(cfg, entry, seed))
    found: list[tuple[float, str, Path]] = []
    for d in root.glob(f"{entry.name}-s{seed}-*"):
        try:
            have = yaml.safe_load((d / "config.yaml").read_text())
            status = json.loads((d / "summary.json").read_text()).get("status")
        except (OSError, ValueError, yaml.YAMLError):
            continue
        if comparable(have) != want:
            continue
        if status == "complete":
            return "complete", d
        if (d / ckpt.FILENAME).exists():
            found.append((d.stat().st_mtime, status, d))
        elif not (d / "metrics.jsonl").exists() and run_is_held(d) is False:
            # killed (or out of disk) before its first checkpoint: nothing trained to keep,
            # so it starts over in its own folder instead of leaving a stale one
            found.append((d.stat().st_mtime, status, d))
    if found:
        return "resume", max(found)[2]
    return "new", None


def check_resume_target(cfg: RunConfig, run_id: str) -> tuple[Entry, int, Path]:
    """resume=RUN_ID: the run folder must exist, hold a checkpoint, and match the config."""
    if run_id in (".", "..") or "/" in run_id or os.sep in run_id or len(run_id) > 255:
        shown = run_id if len(run_id) <= 60 else run_id[:57] + "..."
        raise ConfigError(f"resume={shown!s}: expected a run id (a folder name under "
                          f"{Path(cfg['results_dir']) / cfg.suite.name}, e.g. sgd-small-s0-20261206T...), "
                          "or auto; to continue a run of another results folder, pass results_dir= of that folder")
    path = Path(cfg["results_dir"]) / cfg.suite.name / run_id
    if not (path / "config.yaml").exists():
        raise ConfigError(f"resume={run_id}: no such run under {path.parent} (see the run folders there, or use resume=auto)")
    if not (path / ckpt.FILENAME).exists():
        raise ConfigError(f"resume={run_id}: the run has no checkpoint to resume from ({path / ckpt.FILENAME} is missing)")
    try:
        have = yaml.safe_load((path / "config.yaml").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"resume={run_id}: its config.yaml cannot be read ({type(exc).__name__}); "
                          "restore the file, or start a new run") from None
    if not isinstance(have, dict):
        raise ConfigError(f"resume={run_id}: its config.yaml does not hold a mapping; restore the file, or start a new run")
    entries = {e.name: e for e in cfg.entries}
    entry = entries.get(have.get("entry"))
    if entry is None:
        raise ConfigError(f"resume={run_id}: the run is of entry '{have.get('entry')}', which this command does not run (add policy={have.get('entry')})")
    seed = int(have["seed"])
    want = comparable(run_config_dict(cfg, entry, seed))
    diff = sorted(k for k in set(want) | set(comparable(have)) if want.get(k) != have.get(k))
    if diff:
        k = diff[0]
        a, b = have.get(k), want.get(k)
        if isinstance(a, dict) and isinstance(b, dict):  # policy_config: name the policy key
            sub = sorted(x for x in set(a) | set(b) if a.get(x) != b.get(x))[0]
            k, a, b = f"{have.get('policy_name', entry.policy)}.{sub}", a.get(sub), b.get(sub)
        raise ConfigError(f"resume={run_id}: its config.yaml has {k}={a!r}, this command has {k}={b!r}; "
                          f"resume with the command the run was started with ({len(diff)} key(s) differ)")
    return entry, seed, path
