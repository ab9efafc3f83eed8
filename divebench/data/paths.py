"""Where dataset files live: ``data_dir=``, else ``$DIVEBENCH_DATA``, else ``~/.cache/divebench``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

DATA_ENV_VAR = "DIVEBENCH_DATA"
DEFAULT_DATA_DIR = Path("~/.cache/divebench")


def resolve_data_dir(options: dict[str, Any]) -> Path:
    """Return the folder the data sources read from and download into.

    ``options["data_dir"]`` wins when it is non-empty; an empty value falls back to the
    environment variable ``DIVEBENCH_DATA`` and then to ``~/.cache/divebench`` (the
    same default for every data source, so one download serves every suite).
    """
    chosen = str(options.get("data_dir") or "") or os.environ.get(DATA_ENV_VAR, "")
    path = Path(chosen) if chosen else DEFAULT_DATA_DIR
    return path.expanduser()
