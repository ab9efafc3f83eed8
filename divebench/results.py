"""Run folders and atomic writes: ``<results_dir>/<suite>/<run_id>/``.

Files of a run folder (the record; W&B only mirrors it):
- ``config.yaml``  the resolved configuration of this run (entry, policy config, seed, ...)
- ``env.json``     python, torch, CUDA, device, git SHA and dirty flag, plugin versions
- ``metrics.jsonl`` one JSON row per completed epoch (fields: ``METRIC_FIELDS``)
- ``steps.jsonl``  one JSON row per measured step of a policy with per-step statistics
  (fields: ``STEP_FIELDS``), written with its epoch's row
- ``summary.json`` status (running / complete / diverged / interrupted / failed), final
  and best accuracy, totals, error
- ``checkpoint.pt`` latest end-of-epoch (or signal-time) checkpoint, for resume; kept
  after the run completes unless ``keep_checkpoint=false``
- ``run.log``      warnings and, for a failed run, the traceback

Every file is replaced atomically (write to a temporary file in the same folder, fsync,
rename), so a crash leaves either the old or the new version, never half of one. Run ids
are ``<entry>-s<seed>-<UTC time>-<random>``; the folder is created with an exclusive
``mkdir``, so two runs started in the same second (or by concurrent processes) never
share a folder.
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import json
import math
import os
import platform
import secrets
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

METRIC_FIELDS = (
    "epoch", "step", "samples_seen", "batch_size", "lr", "lr_multiplier", "train_loss",
    "train_acc", "val_loss", "val_acc", "train_time_s", "epoch_train_time_s", "eval_time_s",
    "other_time_s", "wall_time_s", "measured", "grad_diversity", "n_grad_diversity",
    "sum_sq_norms", "grad_sum_sq_norm", "stats_samples", "stats_time_s", "peak_memory_mb",
    "measured_steps",
)
STEP_FIELDS = (
    "epoch", "step", "batch_size", "sum_sq_norms", "grad_sum_sq_norm", "small_batch_size",
    "small_sq_norm", "trace_cov", "true_grad_sq_norm", "estimator", "time_s",
)


class ResultsError(Exception):
    """The results directory cannot be written: a user-facing one-line message."""


LOCK_NAME = ".lock"


def run_is_held(path: Path) -> bool | None:
    """Whether a process holds the run folder's writer lock now (None: the folder has no
    lock file, e.g. written before locks existed, or it cannot be opened)."""
    import fcntl

    lock = Path(path) / LOCK_NAME
    if not lock.exists():
        return None
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the probe's own shared lock
    return False


def lock_run(path: Path) -> int:
    """Take the run folder's writer lock (``fcntl.flock`` on ``<run>/.lock``), held until
    the returned descriptor is closed; the OS releases it when the holder dies. A run
    that another process holds raises :class:`ResultsError` naming that process."""
    import fcntl

    try:
        fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ResultsError(f"cannot open the lock of run {path.name}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 300).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise ResultsError(
            f"run {path.name} is being written by {holder}; one process per run: wait for it to "
            "end (or stop it), then resume"
        ) from None
    os.ftruncate(fd, 0)
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    os.write(fd, f"process {os.getpid()} on {socket.gethostname()} (since {when})".encode())
    return fd


def _clean(obj: Any) -> Any:
    """JSON-safe: non-finite floats become strings ('nan', 'inf') instead of invalid JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise ResultsError(f"cannot write {path}: {exc.strerror or exc}{_hint(exc)}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise ResultsError(f"cannot write {path}: {exc.strerror or exc}{_hint(exc)}") from None
        raise


def _hint(exc: OSError) -> str:
    if is_disk_full(exc):
        return "; free some space, then continue the same command with resume=auto"
    return ""


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(_clean(obj), indent=2, sort_keys=True) + "\n")


def _file_sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def _jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(_clean(r), sort_keys=True) + "\n" for r in rows)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _read_jsonl_tolerant(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file, lines that are not a JSON object left out (a resume checks
    the file against its checkpoint's digest before trusting any of it)."""
    rows = []
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError):
        return []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def lines_digest(text: str, n: int) -> tuple[int, str]:
    """(lines present, sha256 of the first ``n`` lines) of a JSONL file's text."""
    lines = text.splitlines(keepends=True)
    return len(lines), hashlib.sha256("".join(lines[:n]).encode()).hexdigest()


def check_writable(results_dir: Path) -> None:
    """Fail early, before any run starts, if ``results_dir`` cannot hold run folders."""
    try:
        results_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=results_dir, prefix=".write-test.")
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise ResultsError(
            f"results_dir={results_dir} is not writable ({exc.strerror or exc}); choose another with results_dir=PATH"
        ) from None


def new_run_dir(results_dir: Path, suite: str, entry: str, seed: int) -> tuple[str, Path]:
    """Create a fresh, uniquely named run folder (exclusive mkdir, retried on collision)."""
    parent = Path(results_dir) / suite
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ResultsError(f"cannot create {parent}: {exc.strerror or exc}") from None
    for _ in range(100):
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
        run_id = f"{entry}-s{seed}-{stamp}-{secrets.token_hex(3)}"
        path = parent / run_id
        try:
            path.mkdir()
        except FileExistsError:
            continue
        except OSError as exc:
            raise ResultsError(f"cannot create {path}: {exc.strerror or exc}") from None
        return run_id, path
    raise ResultsError(f"could not find a free run id under {parent}")  # pragma: no cover


class RunFolder:
    """Writes one run's files; every write replaces the file atomically."""

    def __init__(self, path: Path, run_id: str) -> None:
        self.path = Path(path)
        self.run_id = run_id
        self.rows: list[dict[str, Any]] = _read_jsonl_tolerant(self.path / "metrics.jsonl")
        self.step_rows: list[dict[str, Any]] = _read_jsonl_tolerant(self.path / "steps.jsonl")
        self._metrics_sha256: str | None = None  # of metrics.jsonl as last written here

    def write_config(self, config: dict[str, Any]) -> None:
        atomic_write_text(self.path / "config.yaml", yaml.safe_dump(_clean(config), sort_keys=False))

    def write_env(self, env: dict[str, Any]) -> None:
        atomic_write_json(self.path / "env.json", env)

    def append_metrics(self, row: dict[str, Any]) -> None:
        rows = self.rows + [row]
        self._write_metrics(rows)

    def _write_metrics(self, rows: list[dict[str, Any]]) -> None:
        """Replace metrics.jsonl with ``rows``; keep the text's sha256 for checkpoints."""
        text = _jsonl(rows)
        atomic_write_text(self.path / "metrics.jsonl", text)
        self.rows = rows
        self._metrics_sha256 = hashlib.sha256(text.encode()).hexdigest()

    def append_steps(self, rows: list[dict[str, Any]]) -> None:
        """Add an epoch's measured-step rows to ``steps.jsonl``."""
        self.step_rows = self.step_rows + rows
        atomic_write_text(self.path / "steps.jsonl", _jsonl(self.step_rows))

    def truncate_metrics(self, epochs: int) -> None:
        """Keep the first ``epochs`` rows (resume from a checkpoint of that epoch)."""
        self._write_metrics([r for r in self.rows if r["epoch"] <= epochs])
        if self.step_rows or (self.path / "steps.jsonl").exists():
            self.step_rows = [r for r in self.step_rows if r["epoch"] <= epochs]
            atomic_write_text(self.path / "steps.jsonl", _jsonl(self.step_rows))

    def state(self) -> dict[str, Any]:
        """What the folder holds now, for a checkpoint: metrics.jsonl's row count and the
        sha256 of its text, and the sha256 of config.yaml."""
        if self._metrics_sha256 is None:  # nothing written by this process yet
            self._metrics_sha256 = hashlib.sha256(_jsonl(self.rows).encode()).hexdigest()
        return {"metrics_rows": len(self.rows), "metrics_sha256": self._metrics_sha256,
                "config_sha256": _file_sha256(self.path / "config.yaml")}

    def check_against(self, state: dict[str, Any]) -> str | None:
        """Why the folder cannot be continued from a checkpoint that recorded ``state``
        (None: it can). A torn or extra line after the recorded rows is not a reason:
        resuming drops it."""
        if _file_sha256(self.path / "config.yaml") != state["config_sha256"]:
            return ("config.yaml was changed after the checkpoint was written; resuming would continue "
                    "under settings the file no longer describes: restore it, or start a new run")
        n = int(state["metrics_rows"])
        try:
            text = (self.path / "metrics.jsonl").read_text()
        except FileNotFoundError:
            text = ""
        except (OSError, UnicodeDecodeError) as exc:
            return f"metrics.jsonl cannot be read ({exc}); restore it, or start a new run"
        have, digest = lines_digest(text, n)
        if have < n:
            return (f"metrics.jsonl holds {have} of the {n} epoch rows written before the checkpoint "
                    "(rows were lost): restore the file, or start a new run")
        if digest != state["metrics_sha256"]:
            return (f"metrics.jsonl's first {n} rows differ from those written before the checkpoint "
                    "(edited or corrupt): restore the file, or start a new run")
        return None

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_json(self.path / "summary.json", summary)

    def log(self, text: str) -> None:
        try:
            with open(self.path / "run.log", "a") as f:
                f.write(text.rstrip("\n") + "\n")
        except OSError:
            pass  # the log is a convenience; losing a line must not lose the run


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux; platform's guess elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: Any, plugins: dict[str, str]) -> dict[str, Any]:
    import torch

    sha = _git("rev-parse", "HEAD")
    dirty = None if sha is None else bool(_git("status", "--porcelain", "--untracked-files=no"))
    cuda = torch.cuda.is_available() and getattr(device, "type", "") == "cuda"
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "git_sha": sha,
        "git_dirty": dirty,
        "plugins": plugins,
        "started_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


class RankFolder(RunFolder):
    """A data-parallel run's folder as ranks other than 0 see it: read, never written
    (rank 0 is the one writer); metric rows are kept in memory only."""

    def write_config(self, config: dict[str, Any]) -> None:
        pass

    def write_env(self, env: dict[str, Any]) -> None:
        pass

    def append_metrics(self, row: dict[str, Any]) -> None:
        self.rows = self.rows + [row]

    def append_steps(self, rows: list[dict[str, Any]]) -> None:
        pass

    def truncate_metrics(self, epochs: int) -> None:
        self.rows = [r for r in self.rows if r["epoch"] <= epochs]

    def write_summary(self, summary: dict[str, Any]) -> None:
        pass

    def log(self, text: str) -> None:
        pass
