"""The plugin contract: every hook a divebench plugin may implement.

Plugins are found through the entry-point group ``divebench`` (see the README's
plugin guide). Built-ins register through these very hooks. Each hook returns a
contribution; the manager merges them and refuses two contributions of one name.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pluggy
from torch import nn

from divebench.data.base import DataBuilder
from divebench.policy import Policy

hookspec = pluggy.HookspecMarker("divebench")
hookimpl = pluggy.HookimplMarker("divebench")

ModelBuilder = Callable[[int, tuple[int, ...], dict[str, Any]], nn.Module]
"""``build(num_classes, input_shape, options) -> nn.Module`` (options from the suite)."""


@hookspec
def divebench_policies() -> list[type[Policy]]:  # type: ignore[empty-body]
    """Return policy classes (subclasses of :class:`divebench.policy.Policy`).

    Each needs a unique ``name``; ``divebench run policy=NAME`` selects it.
    """


@hookspec
def divebench_suites() -> list[Path]:  # type: ignore[empty-body]
    """Return paths of suite YAML files (format: the README's "Suites" section).

    The file's ``name`` key is the suite's name and must be unique.
    """


@hookspec
def divebench_datasets() -> dict[str, DataBuilder]:  # type: ignore[empty-body]
    """Return data sources by name: ``build(options, device, seed) -> DataBundle``."""


@hookspec
def divebench_models() -> dict[str, ModelBuilder]:  # type: ignore[empty-body]
    """Return model builders by name: ``build(num_classes, input_shape, options)``."""
