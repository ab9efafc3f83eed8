"""W&B sweep files and ``--shard i/n`` slices of the run matrix."""

from __future__ import annotations

import itertools

import pytest
import yaml

from divebench.sweep import parse_shard, shard, sweep_yaml


def test_sweep_yaml_runs_divebench_with_key_value_args():
    text = sweep_yaml(
        "mnist1d",
        ["sgd", "divebatch"],
        [1, 2, 3],
        {"divebatch.delta": ["0.1", "0.5"], "lr_schedule": ["cosine"]},
        "bench",
    )
    cfg = yaml.safe_load(text)
    assert cfg["method"] == "grid" and cfg["project"] == "bench"
    assert cfg["command"] == ["${env}", "divebench", "run", "${args_no_hyphens}"]
    p = cfg["parameters"]
    assert p["suite"] == {"value": "mnist1d"}
    assert p["policy"] == {"values": ["sgd", "divebatch"]}
    assert p["seeds"] == {"values": [1, 2, 3]}
    assert p["divebatch.delta"] == {"values": [0.1, 0.5]}  # numbers, not strings
    assert p["lr_schedule"] == {"values": ["cosine"]}
    assert cfg["metric"] == {"name": "final_val_acc", "goal": "maximize"}
    # what the agent would run for one grid point: divebench's own key=value syntax
    args = [f"{k}={v['value'] if 'value' in v else v['values'][0]}" for k, v in p.items()]
    assert args[:3] == ["suite=mnist1d", "policy=sgd", "seeds=1"] and "divebatch.delta=0.1" in args


def test_sweep_rejects_empty_and_clashing_parameters():
    with pytest.raises(ValueError, match="at least one policy"):
        sweep_yaml("s", [], [1], {}, "p")
    with pytest.raises(ValueError, match="at least one seed"):
        sweep_yaml("s", ["sgd"], [], {}, "p")
    with pytest.raises(ValueError, match="grid key 'seeds'"):
        sweep_yaml("s", ["sgd"], [1], {"seeds": ["2"]}, "p")
    with pytest.raises(ValueError, match="grid key 'lr' has no values"):
        sweep_yaml("s", ["sgd"], [1], {"lr": []}, "p")


def test_shards_partition_the_matrix():
    matrix = list(itertools.product(["sgd", "adabatch", "divebatch"], [0, 1, 2, 3, 4]))
    for n in (1, 2, 3, 4, 7, 15, 20):
        shards = [shard(matrix, f"{i}/{n}") for i in range(1, n + 1)]
        flat = [item for s in shards for item in s]
        assert sorted(flat) == sorted(matrix)  # every item exactly once
        assert max(map(len, shards)) - min(map(len, shards)) <= 1  # balanced
    assert shard(matrix, "1/1") == matrix
    assert shard(matrix, "2/3")[:2] == [("sgd", 1), ("sgd", 4)]


@pytest.mark.parametrize("spec", ["0/3", "4/3", "1/0", "a/b", "3", "", "-1/2", "1/2/3"])
def test_bad_shard_specs(spec):
    with pytest.raises(ValueError, match=r"--shard must be i/n with 1 <= i <= n, got "):
        parse_shard(spec)
    with pytest.raises(ValueError):
        shard([1, 2, 3], spec)


def test_shard_spec_tolerates_spaces():
    assert parse_shard(" 2 / 5 ") == (2, 5)


def test_sweep_reads_list_keys_as_run_does(tmp_path):
    """lr_milestones=3,6 is one list (as `divebench run` reads it), alternatives are
    separated by ';', and a fixed setting is checked beside the others."""
    from conftest import run_cli

    out = tmp_path / "s.yaml"
    res = run_cli("sweep", "suite=cifar100", "lr_schedule=multistep", "lr_milestones=3,6", "--out", str(out))
    assert res.exit_code == 0, res.output
    params = yaml.safe_load(out.read_text())["parameters"]
    assert params["lr_milestones"]["values"] == ["3,6"]
    res = run_cli("sweep", "suite=mnist1d", "lr_schedule=multistep", "lr_milestones=3,6;8,12",
                  "divebatch.delta=0.1,0.2", "--out", str(out))
    assert res.exit_code == 0, res.output
    params = yaml.safe_load(out.read_text())["parameters"]
    assert params["lr_milestones"]["values"] == ["3,6", "8,12"]
    assert params["divebatch.delta"]["values"] == [0.1, 0.2]
    res = run_cli("sweep", "suite=mnist1d", "lr_schedule=multistep", "lr_milestones=3,x")
    assert res.exit_code == 2 and "lr_milestones='3,x' is not valid" in res.output


@pytest.mark.parametrize(("key", "msg"), [("lr=1e308", "lr=1e+308 is not valid: it overflows float32"),
                                          ("weight_decay=1e308", "weight_decay=1e+308 is not valid"),
                                          ("weight_decay=inf", "expected a finite number >= 0")])
def test_unrepresentable_values_are_refused_before_any_folder(tmp_path, key, msg):
    from conftest import run_cli

    res = run_cli("run", "suite=synthetic", "seeds=0", key, f"results_dir={tmp_path}", "wandb=off", "-q")
    assert res.exit_code == 2 and msg in res.output
    assert not list(tmp_path.rglob("config.yaml"))
