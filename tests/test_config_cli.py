"""Config resolution and the CLI's handling of user errors: every one gives exit 2, one
line naming the problem and the fix, no traceback, and no run folder."""

from __future__ import annotations

import pytest
from conftest import run_cli

from divebench.config import ConfigError, parse_overrides, resolve
from divebench.plugins import get_registry


def _resolve(*tokens: str):
    return resolve(parse_overrides(tokens), get_registry())


def test_precedence_and_sources() -> None:
    cfg = _resolve("suite=mnist1d", "epochs=3", "divebatch.delta=0.5")
    assert cfg["epochs"] == 3 and cfg.sources["epochs"] == "command line"
    assert cfg["batch_size"] == 32 and cfg.sources["batch_size"] == "suite mnist1d"
    assert cfg["eval_batch_size"] == 2048 and cfg.sources["eval_batch_size"] == "default"
    entries = {e.name: e for e in cfg.entries}
    assert entries["divebatch"].params["delta"] == 0.5
    assert cfg.entry_sources["divebatch"]["delta"] == "command line"
    # ${max_batch_size} in the suite resolves against the final run config
    cfg2 = _resolve("suite=mnist1d", "max_batch_size=256")
    assert {e.name: e for e in cfg2.entries}["sgd-large"].params["batch_size"] == 256


def test_policy_selects_entries_and_plain_policies() -> None:
    cfg = _resolve("suite=mnist1d", "policy=sgd-large,adabatch")
    assert [e.name for e in cfg.entries] == ["sgd-large", "adabatch"]
    cfg = _resolve("suite=synthetic", "policy=sgd")
    assert [(e.name, e.policy) for e in cfg.entries] == [("sgd", "sgd")]


@pytest.mark.parametrize(
    ("tokens", "expect"),
    [
        (["suite=mnist1", "epochs=1"], "unknown suite 'mnist1'; did you mean 'mnist1d'?"),
        (["policy=divebach"], "did you mean 'divebatch'?"),
        (["epoch=3"], "unknown key 'epoch'; did you mean 'epochs'?"),
        (["delta=0.1"], "write 'divebatch.delta=0.1'"),
        (["divebatch.detla=0.1"], "did you mean 'delta'?"),
        (["epochs=three"], "epochs='three' is not valid: expected int"),
        (["lr=fast"], "lr='fast' is not valid: expected float"),
        (["device=tpu"], "expected auto | cpu | cuda"),
        (["epochs=0"], "epochs=0 is not valid: expected an int >= 1"),
        (["batch_size=0"], "batch_size=0 is not valid"),
        (["batch_size=-4"], "batch_size=-4 is not valid"),
        (["batch_size=64", "max_batch_size=32"], "B0 must be <= B_max"),
        (["divebatch.delta=0"], "divebatch.delta=0.0 is not valid: expected a number > 0"),
        (["divebatch.delta=-1"], "expected a number > 0"),
        (["batch_size=100000", "max_batch_size=100000"], "larger than the training set"),
        (["seeds=a,b"], "seeds='a,b' is not valid"),
        (["justaword"], "is not key=value"),
        (["sgd-large.batch_size=x"], "sgd.batch_size='x' is not valid: expected int"),
    ],
)
def test_user_errors_exit_2_one_line(tmp_path, tokens, expect) -> None:
    res = run_cli("run", *tokens, f"results_dir={tmp_path}", "wandb=off", "-q")
    assert res.exit_code == 2, res.output
    lines = [x for x in res.output.splitlines() if x.strip()]
    assert len(lines) == 1, res.output
    assert lines[0].startswith("divebench: error: ")
    assert expect in lines[0], lines[0]
    assert "Traceback" not in res.output
    assert not any(tmp_path.rglob("*-s*-*")), "a run folder was left behind"


def test_show_config_lists_sources() -> None:
    res = run_cli("run", "suite=mnist1d", "epochs=7", "--show-config")
    assert res.exit_code == 0
    assert "epochs" in res.output and "# command line" in res.output
    assert "# suite mnist1d" in res.output
    assert "divebatch.delta" in res.output


def test_malformed_suite_yaml(tmp_path, register_plugin) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: broken\ndefaults: {epochs: [1, 2\n")

    class P:
        from divebench.hookspecs import hookimpl

        @staticmethod
        @hookimpl
        def divebench_suites():
            return [bad]

    with pytest.raises(Exception, match="not valid YAML"):
        register_plugin("badsuite", P)


def test_unknown_key_in_suite_file(tmp_path) -> None:
    from divebench.config import load_suite

    f = tmp_path / "s.yaml"
    f.write_text("name: s\ndefaults: {epochz: 3}\nentries: {a: {policy: sgd}}\n")
    with pytest.raises(ConfigError, match="unknown key 'epochz' in defaults; did you mean 'epochs'"):
        load_suite(f)


def test_help_is_helpful() -> None:
    res = run_cli("run", "--help")
    assert res.exit_code == 0
    assert "suite=NAME" in res.output and "resume=auto" in res.output
    res = run_cli("run", "--keys")
    assert "max_micro_batch" in res.output and "lr_schedule" in res.output


def test_listings() -> None:
    import json

    pol = json.loads(run_cli("policies", "--json").output)
    names = {p["name"] for p in pol}
    assert {"sgd", "adabatch", "divebatch"} <= names
    div = next(p for p in pol if p["name"] == "divebatch")
    assert div["stats"] == "per_sample_sq_norms" and div["keys"]["delta"]["default"] == 0.1
    suites = json.loads(run_cli("suites", "--json").output)
    assert {"synthetic", "mnist1d"} <= {s["name"] for s in suites}
    plugins = json.loads(run_cli("plugins", "--json").output)
    assert plugins[0]["name"] == "builtin" and plugins[0]["status"] == "loaded"


def test_missing_data_dir_is_one_line(tmp_path) -> None:
    res = run_cli("run", "suite=cifar10", f"data_dir={tmp_path / 'nowhere'}", "epochs=1", "seeds=1",
                  f"results_dir={tmp_path / 'r'}", "wandb=off", "-q")
    assert res.exit_code == 2 and res.output.count("\n") == 1, res.output
    assert "not found" in res.output and "download=true" in res.output
    assert not (tmp_path / "r" / "cifar10").exists()


def test_corrupt_dataset_file_is_named(tmp_path) -> None:
    root = tmp_path / "data" / "cifar-10-batches-py"
    root.mkdir(parents=True)
    for name in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                 "test_batch", "batches.meta"]:
        (root / name).write_bytes(b"\x80\x04garbage")
    res = run_cli("run", "suite=cifar10", f"data_dir={tmp_path / 'data'}", "epochs=1", "seeds=1",
                  f"results_dir={tmp_path / 'r'}", "wandb=off", "-q")
    assert res.exit_code == 2 and res.output.count("\n") == 1, res.output
    assert "data_batch_1" in res.output or "test_batch" in res.output or "batches.meta" in res.output
    assert not (tmp_path / "r" / "cifar10").exists()


def test_malformed_suite_yaml_through_cli(tmp_path, monkeypatch) -> None:
    """A plugin shipping a broken suite file: strict mode stops with one line naming it."""
    import sys
    import textwrap

    bad = tmp_path / "broken.yaml"
    bad.write_text("name: broken\ndefaults: {epochs: [1, 2\n")
    dist = tmp_path / "suiteplug-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: suiteplug\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[divebench]\nsuiteplug = suiteplug_mod\n")
    (tmp_path / "suiteplug_mod.py").write_text(textwrap.dedent(f"""
        from divebench.hookspecs import hookimpl
        @hookimpl
        def divebench_suites():
            return [{str(bad)!r}]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("suiteplug_mod", None)
    res = run_cli("run", "suite=broken", f"results_dir={tmp_path / 'r'}", "-q")
    assert res.exit_code == 2 and res.output.count("\n") == 1, res.output
    assert "broken.yaml line 3 is not valid YAML" in res.output and "suiteplug" in res.output


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (["run", "--bogus"], "No such option '--bogus'"),
        (["compare", "only-one"], "Missing argument 'NEW'"),
        (["run", "suite=synthetic", "lr=inf"], "expected a finite number > 0"),
        (["run", "suite=synthetic", "lr_schedule=multistep"], "needs lr_milestones="),
        (["run", "suite=synthetic", "lr_gamma=-1"], "lr_gamma=-1.0 is not valid"),
        (["run", "suite=synthetic", "threads=-1"], "threads=-1 is not valid"),
        (["run", "suite=synthetic", "policy=sgd-small,sgd-small"], "names 'sgd-small' twice"),
        (["run", "suite=synthetic", "seeds=0,0"], "lists a seed twice"),
        (["run", "suite=synthetic", "policy=sgd-small", "adabatch.variant=foo"], "expected paper | original"),
        (["run", "suite=synthetic", "n_samples=1"], "the training set is empty"),
        (["run", "suite=synthetic", "model=resnet18_cifar", "seeds=0"], "model=resnet18_cifar cannot be built"),
        (["report", "results_dir=,"], "results_dir= is empty"),
        (["sweep", "suite=mnist1d", "--out", "/nonexistent/dir/s.yaml"], "cannot write"),
    ],
)
def test_more_user_errors_are_one_line(tmp_path, args, expect) -> None:
    extra = [f"results_dir={tmp_path}", "wandb=off", "-q"] if args[0] == "run" and len(args) > 2 else []
    res = run_cli(*args, *extra)
    assert res.exit_code == 2, res.output
    lines = [x for x in res.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("divebench: error: ") and expect in lines[0], res.output
    assert not any(tmp_path.rglob("*-s*-*"))


def test_entry_key_beats_policy_key(tmp_path) -> None:
    cfg = _resolve("suite=synthetic", "policy=sgd,sgd-large", "sgd-large.batch_size=128", "sgd.batch_size=64")
    sizes = {e.name: e.params["batch_size"] for e in cfg.entries}
    assert sizes == {"sgd": 64, "sgd-large": 128}
