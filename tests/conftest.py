"""Shared fixtures. Tests run with strict plugin loading, W&B off unless a test says
otherwise, and never touch the network."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
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


@pytest.fixture
def local_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """An HTTP server on 127.0.0.1 serving a temporary folder: (base URL, folder).
    Download code paths are tested against it; nothing leaves the machine."""
    folder = tmp_path / "served"
    folder.mkdir()

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", folder
    server.shutdown()
    server.server_close()


def read_rows(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def run_cli(*args: str) -> Any:
    from click.testing import CliRunner

    from divebench.cli import main

    return CliRunner().invoke(main, list(args), catch_exceptions=False)
