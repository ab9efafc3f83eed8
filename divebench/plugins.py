"""The plugin manager: built-ins first, then entry points of group ``divebench``.

Third-party plugins load one at a time. A plugin that fails to import, whose hook
raises, or that contributes a name already taken is named in a warning and skipped;
with ``DIVEBENCH_STRICT_PLUGINS=1`` each of those is an error (tests and CI run strict).
"""

from __future__ import annotations

import importlib.metadata as md
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import pluggy

from divebench import hookspecs

ENTRY_POINT_GROUP = "divebench"
KINDS = ("policies", "suites", "datasets", "models")


class PluginError(Exception):
    """A plugin misbehaved and strict mode is on (or it cannot be skipped)."""


@dataclass
class PluginInfo:
    name: str
    version: str
    source: str  # "builtin" or "entry point <dist>"
    status: str = "loaded"  # "loaded" or "skipped: <why>"
    contributes: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class Registry:
    """Everything the loaded plugins contribute, each entry with its plugin's name."""

    policies: dict[str, tuple[Any, str]] = field(default_factory=dict)
    suites: dict[str, tuple[Any, str]] = field(default_factory=dict)
    datasets: dict[str, tuple[Any, str]] = field(default_factory=dict)
    models: dict[str, tuple[Any, str]] = field(default_factory=dict)
    plugins: list[PluginInfo] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def plugin_versions(self) -> dict[str, str]:
        return {p.name: p.version for p in self.plugins if p.status == "loaded"}


def strict_mode() -> bool:
    return os.environ.get("DIVEBENCH_STRICT_PLUGINS", "") not in ("", "0", "false", "no")


def _problem(reg: Registry, message: str, strict: bool) -> None:
    if strict:
        raise PluginError(message + " (DIVEBENCH_STRICT_PLUGINS is set)")
    reg.warnings.append(message + "; skipped")


def _entries(kind: str, value: Any) -> dict[str, Any]:
    """Normalise a hook's return value to {name: object}."""
    if value is None:
        return {}
    if kind == "policies":
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"divebench_policies returned {type(value).__name__}; expected a list of Policy classes")
        from divebench.policy import Policy

        out: dict[str, Any] = {}
        for cls in value:
            if not (isinstance(cls, type) and issubclass(cls, Policy)) or not cls.name:
                raise TypeError(f"divebench_policies returned {cls!r}; expected a Policy subclass with a name")
            if cls.name in out:
                raise TypeError(f"divebench_policies returned policy name '{cls.name}' twice")
            out[cls.name] = cls
        return out
    if kind == "suites":
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"divebench_suites returned {type(value).__name__}; expected a list of YAML paths")
        from divebench.config import suite_name_of

        return {suite_name_of(p): p for p in value}
    if not isinstance(value, dict) or not all(callable(v) for v in value.values()):
        raise TypeError(f"divebench_{kind} returned {type(value).__name__}; expected a dict of name -> builder")
    return dict(value)


def _collect(pm: pluggy.PluginManager, name: str, info: PluginInfo, reg: Registry, strict: bool) -> bool:
    """Call every hook of one plugin; merge its contributions or report why not."""
    plugin = pm.get_plugin(name)
    staged: dict[str, dict[str, Any]] = {}
    for kind in KINDS:
        hook = getattr(pm.hook, f"divebench_{kind}")
        for impl in hook.get_hookimpls():
            if impl.plugin is not plugin:
                continue
            try:
                staged[kind] = _entries(kind, impl.function())
            except (Exception, SystemExit) as exc:  # a plugin's fault, whatever it is
                _problem(reg, f"plugin '{name}': hook divebench_{kind} failed: {type(exc).__name__}: {exc}", strict)
                info.status = f"skipped: divebench_{kind} failed"
                return False
    for kind, entries in staged.items():
        table = getattr(reg, kind)
        for key in entries:
            if key in table:
                _problem(reg, f"plugin '{name}': {kind[:-1] if kind != 'policies' else 'policy'} name '{key}' is already registered by plugin '{table[key][1]}'", strict)
                info.status = f"skipped: duplicate name '{key}'"
                return False
    for kind, entries in staged.items():
        table = getattr(reg, kind)
        for key, obj in entries.items():
            table[key] = (obj, name)
        info.contributes[kind] = sorted(entries)
    return True


def load_plugins(strict: bool | None = None, extra: list[tuple[str, Any]] | None = None) -> Registry:
    """Build the registry: built-ins, installed entry points, then ``extra`` plugins
    (``(name, module_or_object)`` pairs, used by tests to register one for a test)."""
    strict = strict_mode() if strict is None else strict
    from divebench import __version__, builtins

    pm = pluggy.PluginManager("divebench")
    pm.add_hookspecs(hookspecs)
    reg = Registry()

    candidates: list[tuple[str, str, str, Any]] = [("builtin", __version__, "builtin", builtins)]
    eps = md.entry_points(group=ENTRY_POINT_GROUP)
    for ep in sorted(eps, key=lambda e: e.name):
        dist = ep.dist.name if ep.dist is not None else "?"
        version = ep.dist.version if ep.dist is not None else "?"
        try:
            obj = ep.load()
        except (Exception, SystemExit) as exc:  # a module that calls sys.exit on import too
            _problem(reg, f"plugin '{ep.name}' ({dist}) failed to import: {type(exc).__name__}: {exc}", strict)
            reg.plugins.append(PluginInfo(ep.name, version, f"entry point {dist}", "skipped: import failed"))
            continue
        candidates.append((ep.name, version, f"entry point {dist}", obj))
    for name, obj in extra or []:
        candidates.append((name, getattr(obj, "__version__", "?"), "registered in process", obj))

    for name, version, source, obj in candidates:
        info = PluginInfo(name, version, source)
        reg.plugins.append(info)
        if pm.has_plugin(name):
            _problem(reg, f"plugin '{name}' ({source}) has the name of a plugin already loaded", strict)
            info.status = "skipped: duplicate plugin name"
            continue
        try:
            pm.register(obj, name=name)
            pm.check_pending()  # a misspelled hook (divebench_polices) is an error, not silence
        except (Exception, SystemExit) as exc:
            if pm.has_plugin(name):
                pm.unregister(name=name)
            _problem(reg, f"plugin '{name}' ({source}) failed to register: {type(exc).__name__}: {exc}", strict)
            info.status = "skipped: registration failed"
            continue
        if not _collect(pm, name, info, reg, strict):
            pm.unregister(name=name)
    return reg


_CACHE: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry (loaded once)."""
    global _CACHE
    if _CACHE is None:
        _CACHE = load_plugins()
    return _CACHE


def set_registry(reg: Registry | None) -> None:
    """Replace (or with None, forget) the process-wide registry; for tests."""
    global _CACHE
    _CACHE = reg


def warn(reg: Registry) -> None:
    for w in reg.warnings:
        print(f"divebench: warning: {w}", file=sys.stderr)
