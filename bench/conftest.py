"""Shared configuration of the regression benchmarks (``pytest bench``).

- ``--update-golden`` rewrites bench/golden/*.json from the current code instead of
  comparing against them (do it deliberately, and say why in the commit).
- Absolute timings are kept but never gated: pytest-benchmark's storage defaults to
  ``.benchmarks/<machine>`` (CPU model, core count, GPU, torch version), so
  ``--benchmark-autosave --benchmark-compare`` compares against the last run on the same
  machine only; the pass/fail gates are same-run ratios (bench/thresholds.py).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from divebench.results import cpu_model

REPO_ROOT = Path(__file__).resolve().parent.parent
_DEFAULT_STORAGE = "file://./.benchmarks"  # pytest-benchmark's default


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "nogpu"


def machine_id() -> str:
    """A folder-safe name of what absolute timings depend on: CPU model and core count,
    GPU, torch version."""
    import torch

    raw = f"{cpu_model()}-{os.cpu_count()}cpu-{_gpu_name()}-torch{torch.__version__}"
    return re.sub(r"[^A-Za-z0-9.+]+", "-", raw).strip("-").lower()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-golden", action="store_true", default=False,
        help="rewrite bench/golden/*.json from this code instead of comparing against them",
    )


def pytest_configure(config: pytest.Config) -> None:
    # pytest-benchmark builds its session in a trylast pytest_configure, after this one:
    # point its storage at this machine's folder unless the user chose a storage.
    if getattr(config.option, "benchmark_storage", None) == _DEFAULT_STORAGE:
        config.option.benchmark_storage = f"file://{REPO_ROOT / '.benchmarks' / machine_id()}"


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    import torch

    machine_info["divebench_machine_id"] = machine_id()
    machine_info["cpu_model"] = cpu_model()
    machine_info["gpu"] = _gpu_name()
    machine_info["torch"] = torch.__version__
    machine_info["torch_threads"] = torch.get_num_threads()


@pytest.fixture(scope="session")
def update_golden(request: pytest.FixtureRequest) -> bool:
    """True when the run was asked to rewrite the golden files."""
    return bool(request.config.getoption("--update-golden"))
