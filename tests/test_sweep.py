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
