"""A non-editable install carries the suites: the built wheel holds the YAML files and
`divebench.suites` resolves them from the installed package."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contains_suites_and_contract(tmp_path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True, timeout=300)
    (whl,) = tmp_path.glob("divebench-*.whl")
    names = set(zipfile.ZipFile(whl).namelist())
    for suite in ("synthetic", "mnist1d", "cifar10", "cifar100", "tinyimagenet", "cifar"):
        assert f"divebench/suites/{suite}.yaml" in names
    assert {"divebench/py.typed", "divebench/policy.py", "divebench/hookspecs.py"} <= names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "divebench = divebench.cli:main" in zipfile.ZipFile(whl).read(entry_points).decode()
