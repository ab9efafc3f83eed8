"""Plugin loading: built-ins through the hooks, entry points one at a time, faulty
plugins named in a warning and skipped, or an error in strict mode."""

from __future__ import annotations

import sys
import textwrap

import pytest
from conftest import run_cli

from divebench.hookspecs import hookimpl
from divebench.plugins import PluginError, load_plugins, set_registry
from divebench.policy import Decision, Policy


def _fake_distribution(tmp_path, monkeypatch, name: str, module_src: str) -> None:
    """Install a real (metadata-only) distribution with a `divebench` entry point on sys.path."""
    dist = tmp_path / f"{name}-1.2.3.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.2.3\n")
    (dist / "entry_points.txt").write_text(f"[divebench]\n{name} = {name}_mod\n")
    (tmp_path / f"{name}_mod.py").write_text(textwrap.dedent(module_src))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop(f"{name}_mod", None)


def test_builtins_register_through_hooks() -> None:
    reg = load_plugins(strict=True)
    assert {"sgd", "adabatch", "divebatch"} <= set(reg.policies)
    assert all(reg.policies[p][1] == "builtin" for p in ("sgd", "adabatch", "divebatch"))
    assert {"synthetic", "mnist1d"} <= set(reg.suites)


def test_entry_point_plugin_is_loaded(tmp_path, monkeypatch) -> None:
    _fake_distribution(tmp_path, monkeypatch, "goodplug", """
        from divebench.hookspecs import hookimpl
        from divebench.policies.sgd import FixedSGD
        class Tiny(FixedSGD):
            name = "tiny"
            description = "sgd again"
        @hookimpl
        def divebench_policies():
            return [Tiny]
    """)
    reg = load_plugins(strict=True)
    assert reg.policies["tiny"][1] == "goodplug"
    info = next(p for p in reg.plugins if p.name == "goodplug")
    assert (info.version, info.status, info.source) == ("1.2.3", "loaded", "entry point goodplug")


def test_import_error_is_named_and_skipped_or_strict(tmp_path, monkeypatch) -> None:
    _fake_distribution(tmp_path, monkeypatch, "brokenplug", "import no_such_module_xyz\n")
    reg = load_plugins(strict=False)
    assert any("plugin 'brokenplug' (brokenplug) failed to import: ModuleNotFoundError" in w for w in reg.warnings)
    assert "sgd" in reg.policies  # the rest still loads
    with pytest.raises(PluginError, match="brokenplug"):
        load_plugins(strict=True)
    # through the CLI: a warning line when lenient, exit 2 and one line when strict
    monkeypatch.setenv("DIVEBENCH_STRICT_PLUGINS", "0")
    res = run_cli("plugins")
    assert res.exit_code == 0 and "warning: plugin 'brokenplug'" in res.output
    monkeypatch.setenv("DIVEBENCH_STRICT_PLUGINS", "1")
    set_registry(None)  # the CLI caches the registry per process
    res = run_cli("plugins")
    assert res.exit_code == 2 and res.output.count("\n") == 1 and "brokenplug" in res.output


class Raising:
    @staticmethod
    @hookimpl
    def divebench_policies():
        raise RuntimeError("boom")


class Duplicate:
    class Sgd2(Policy):
        name = "sgd"
        description = "clashes with the built-in"

        def decide_epoch(self, state):
            return Decision(1)

    @staticmethod
    @hookimpl
    def divebench_policies():
        return [Duplicate.Sgd2]


class WrongType:
    @staticmethod
    @hookimpl
    def divebench_policies():
        return {"not": "a list"}


class Misspelled:
    @staticmethod
    @hookimpl
    def divebench_polices():  # typo: check_pending() must catch it
        return []


@pytest.mark.parametrize(
    ("plugin", "message"),
    [
        (Raising, "plugin 'faulty': hook divebench_policies failed: RuntimeError: boom"),
        (Duplicate, "plugin 'faulty': policy name 'sgd' is already registered by plugin 'builtin'"),
        (WrongType, "plugin 'faulty': hook divebench_policies failed: TypeError: divebench_policies returned dict"),
        (Misspelled, "plugin 'faulty' (registered in process) failed to register"),
    ],
)
def test_faulty_plugins(plugin, message) -> None:
    reg = load_plugins(strict=False, extra=[("faulty", plugin)])
    assert any(message in w for w in reg.warnings), reg.warnings
    assert reg.policies["sgd"][1] == "builtin"
    assert next(p for p in reg.plugins if p.name == "faulty").status.startswith("skipped")
    with pytest.raises(PluginError, match="faulty"):
        load_plugins(strict=True, extra=[("faulty", plugin)])


class MidRunRaiser:
    class Exploding(Policy):
        name = "exploding"
        description = "raises inside decide_epoch at epoch 1"

        def decide_epoch(self, state):
            if state.epoch == 1:
                raise ZeroDivisionError("policy bug")
            return Decision(16)

    @staticmethod
    @hookimpl
    def divebench_policies():
        return [MidRunRaiser.Exploding]


def test_policy_raising_mid_run_fails_run_and_suite_goes_on(tmp_path, register_plugin) -> None:
    import json

    register_plugin("exploder", MidRunRaiser)
    res = run_cli("run", "suite=synthetic", "policy=exploding,sgd-small", "seeds=0,1", "epochs=2", "n_samples=600",
                  f"results_dir={tmp_path}", "wandb=off", "--no-report", "-q")
    assert res.exit_code == 1
    assert "failed: ZeroDivisionError: policy bug" in res.output
    summaries = [json.loads((p / "summary.json").read_text()) for p in (tmp_path / "synthetic").iterdir()]
    by = {(s["entry"], s["seed"]): s["status"] for s in summaries}
    assert by == {("exploding", 0): "failed", ("exploding", 1): "failed",
                  ("sgd-small", 0): "complete", ("sgd-small", 1): "complete"}
