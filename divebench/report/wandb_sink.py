"""The Weights & Biases sink: one sink among others, never the only record.

- Modes: ``off``; ``offline`` (written under the run folder, ``wandb sync`` later);
  ``online``; ``auto`` = online when the user is logged in (``WANDB_API_KEY`` or a netrc
  entry for the W&B host: checked on disk, no network), else offline. ``WANDB_MODE`` set
  to offline/disabled in the environment is honoured by ``auto``.
- The W&B folder is ``<run_dir>/wandb/`` and the W&B run id is divebench's run id, so a
  resumed run continues the same W&B run (``resume="allow"``). Under a W&B sweep agent
  (``WANDB_SWEEP_ID`` set) the agent's run id is used instead, or the run would not
  attach to the sweep.
- x-axes: every row metric is defined with ``step_metric="epoch"``. W&B allows one step
  metric per metric, so the charts against time and samples use copies of the headline
  metrics under ``by_time/`` (step metric ``train_time_s``) and ``by_samples/`` (step
  metric ``samples_seen``): the default workspace then draws all three views without any
  manual axis choice. (Any logged metric can also be picked as the x-axis of a chart;
  the report built by ``wandb_report`` does that with the plain names.)
- Failures (wandb not installed, init error, bad key, no network, a log call that
  raises) print ONE line to stderr and switch the sink off for the rest of the run; the
  run and its folder go on. An online init that fails falls back to offline once, and
  the process remembers it so later runs do not wait for the network again.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any

MODES = ("off", "offline", "online", "auto")
# Metrics drawn against time and samples too (copies under by_time/ and by_samples/).
ALT_X_METRICS = ("val_acc", "val_loss", "train_loss", "batch_size")
ALT_X = {"by_time": "train_time_s", "by_samples": "samples_seen"}
INIT_TIMEOUT_S = 30.0

_online_failed = False  # an online init failed in this process: later runs go offline
_warned: set[str] = set()


def _warn(reason: str) -> None:
    """One line on stderr, once per process and reason."""
    line = " ".join(reason.split())[:240]
    if line in _warned:
        return
    _warned.add(line)
    print(f"divebench: W&B: {line}; the run folder keeps every record", file=sys.stderr, flush=True)


def logged_in() -> bool:
    """Whether W&B credentials are on this machine (env or netrc); never touches the network."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import wandb
        from wandb.sdk.lib import wbauth

        host = wandb.Settings().base_url
        return bool(wbauth.read_netrc_auth(host=host))
    except Exception:  # a private API that moved, or a malformed netrc: read netrc ourselves
        import netrc
        from urllib.parse import urlsplit

        host = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or ""
        try:
            return netrc.netrc().authenticators(host) is not None
        except (OSError, netrc.NetrcParseError):
            return False


def resolve_mode(mode: str) -> str:
    """``off`` | ``offline`` | ``online`` for a configured mode (``auto`` decided here)."""
    if mode not in MODES:
        raise ValueError(f"wandb={mode!r} is not valid: expected one of {', '.join(MODES)}")
    if mode != "auto":
        return mode
    env_mode = os.environ.get("WANDB_MODE", "").lower()
    if env_mode == "disabled":
        return "off"
    if env_mode in ("offline", "dryrun"):
        return "offline"
    if _online_failed:
        return "offline"
    return "online" if logged_in() else "offline"


def _scalar(v: Any) -> Any:
    if isinstance(v, bool):
        return int(v)
    return v


class WandbSink:
    """Mirrors one run into W&B. Every public method is safe to call in any state."""

    def __init__(
        self, init_timeout_s: float = INIT_TIMEOUT_S, settings: dict[str, Any] | None = None
    ) -> None:
        self.run: Any = None
        self.info: dict[str, Any] | None = None  # goes into summary.json as "wandb"
        self._init_timeout_s = init_timeout_s
        self._extra_settings = dict(settings or {})
        self._defined: set[str] = set()

    # -- lifecycle ----------------------------------------------------------------

    def start(
        self,
        run_dir: Path,
        config: dict[str, Any],
        env: dict[str, Any],
        mode: str,
        project: str,
        group: str,
        job_type: str,
        name: str,
        run_id: str,
        resume: bool = False,
    ) -> None:
        """Open (or resume) the W&B run of ``run_id``; on any failure warn once and go on."""
        global _online_failed
        wanted = resolve_mode(mode)
        wandb_dir = Path(run_dir) / "wandb"
        self.info = (
            None
            if wanted == "off"
            else {
                "mode": wanted,
                "dir": str(wandb_dir),
                "run_id": run_id,
                "sync_command": None,
                "error": None,
            }
        )
        if wanted == "off":
            return
        try:
            import wandb
        except ImportError as exc:
            self._fail(f"wandb cannot be imported ({exc}); W&B logging is off")
            return
        kwargs: dict[str, Any] = dict(
            dir=str(run_dir),
            project=project,
            group=group,
            job_type=job_type,
            name=name,
            id=run_id,
            resume="allow",
            config={**config, "env": env, "resumed": bool(resume)},
        )
        if os.environ.get("WANDB_SWEEP_ID"):
            kwargs.pop("id")  # the sweep agent names the run (WANDB_RUN_ID)
        try:
            wandb_dir.mkdir(parents=True, exist_ok=True)
            self.run = wandb.init(mode=wanted, settings=self._settings(wandb), **kwargs)
        except Exception as exc:  # W&B raises many types; none may stop the run
            self.run = None
            if wanted != "online":
                self._fail(f"init failed ({type(exc).__name__}: {exc}); W&B logging is off")
                return
            _online_failed = True
            _warn(
                f"online init failed ({type(exc).__name__}: {exc}); logging offline instead, "
                f"`wandb sync` later"
            )
            self._teardown(wandb)
            try:
                self.run = wandb.init(mode="offline", settings=self._settings(wandb), **kwargs)
            except Exception as exc2:
                self.run = None
                self._fail(
                    f"offline init failed too ({type(exc2).__name__}: {exc2}); W&B logging is off"
                )
                return
            self.info["mode"] = "offline"
        self._after_init()

    def _settings(self, wandb: Any) -> Any:
        # No stats sampler (it competes with training for CPU and would perturb the clock;
        # env.json and peak_memory_mb record the machine), no console capture (the
        # console has its own progress lines), no pip freeze per run.
        opts: dict[str, Any] = dict(
            x_disable_stats=True,
            console="off",
            silent=True,
            x_save_requirements=False,
            disable_code=True,
            init_timeout=self._init_timeout_s,
        )
        opts.update(self._extra_settings)
        return wandb.Settings(**opts)

    @staticmethod
    def _teardown(wandb: Any) -> None:
        # a failed init leaves its run id "in use" in the W&B service: restart it
        try:
            wandb.teardown()
        except Exception:
            pass

    def _after_init(self) -> None:
        assert self.info is not None
        run = self.run
        sync_dir = getattr(getattr(run, "settings", None), "sync_dir", None)
        self.info["run_id"] = run.id
        if sync_dir:
            self.info["sync_dir"] = str(sync_dir)
        if self.info["mode"] == "offline":
            self.info["sync_command"] = f"wandb sync {sync_dir or self.info['dir']}"
        else:
            self.info["url"] = getattr(run, "url", None)
        try:
            run.define_metric("epoch")
            for prefix, x in ALT_X.items():
                run.define_metric(x)
                for m in ALT_X_METRICS:
                    run.define_metric(f"{prefix}/{m}", step_metric=x)
                    self._defined.add(f"{prefix}/{m}")
            self._defined.update(("epoch", *ALT_X.values()))
        except Exception as exc:
            self._fail(f"define_metric failed ({type(exc).__name__}: {exc}); W&B logging is off")

    def _fail(self, reason: str) -> None:
        """Warn once and switch the sink off; what W&B already wrote offline stays syncable."""
        _warn(reason)
        if self.info is not None:
            self.info["error"] = reason
        if self.run is not None:
            try:
                self.run.finish(exit_code=1)
            except Exception:
                pass
        self.run = None

    # -- per epoch ----------------------------------------------------------------

    def log_epoch(self, row: dict[str, Any]) -> None:
        """Log one metrics row (the dict written to metrics.jsonl). Nulls are left out, so
        statistics appear only on the epochs that measured them."""
        if self.run is None:
            return
        data = {
            k: _scalar(v)
            for k, v in row.items()
            if v is not None and not isinstance(v, (dict, list, str))
        }
        for prefix in ALT_X:
            for m in ALT_X_METRICS:
                if m in data:
                    data[f"{prefix}/{m}"] = data[m]
        try:
            for k in data:
                if k not in self._defined:
                    self.run.define_metric(k, step_metric="epoch")
                    self._defined.add(k)
            self.run.log(data)
        except Exception as exc:
            self._fail(f"log failed ({type(exc).__name__}: {exc}); W&B logging is off for this run")

    def finish(self, summary: dict[str, Any]) -> dict[str, Any] | None:
        """Write the run's summary scores, close the W&B run, return ``info`` for summary.json."""
        if self.run is not None:
            try:
                for k, v in summary.items():
                    if k == "wandb" or isinstance(v, (dict, list)):
                        continue
                    if isinstance(v, float) and not math.isfinite(v):
                        v = str(v)
                    self.run.summary[k] = _scalar(v)
                status = summary.get("status")
                self.run.finish(exit_code=0 if status in ("complete", "diverged", None) else 1)
            except Exception as exc:
                self._fail(f"finish failed ({type(exc).__name__}: {exc})")
            self.run = None
        return self.info
