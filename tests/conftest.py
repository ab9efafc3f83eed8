"""Shared fixtures. Tests run with strict plugin loading, W&B off unless a test says
otherwise, and never touch the network."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("DIVEBENCH_STRICT_PLUGINS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture
def register_plugin() -> Iterator[Any]:
    """Register an in-process plugin object for one test (strict mode), then restore."""
    from divebench import plugins

    def _register(name: str, obj: Any, strict: bool = True) -> plugins.Registry:
        reg = plugins.load_plugins(strict=strict, extra=[(name, obj)])
        plugins.set_registry(reg)
        return reg

    yield _register
    plugins.set_registry(None)


@pytest.fixture(autouse=True)
def _fresh_registry() -> Iterator[None]:
    from divebench import plugins

    plugins.set_registry(None)
    yield
    plugins.set_registry(None)


def read_rows(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def run_cli(*args: str) -> Any:
    from click.testing import CliRunner

    from divebench.cli import main

    return CliRunner().invoke(main, list(args), catch_exceptions=False)
