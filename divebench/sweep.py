"""Many runs: a W&B sweep file, or ``--shard i/n`` slices of the run matrix for clusters.

A W&B sweep agent runs ``divebench run`` with the sweep's parameters as ``key=value``
arguments (W&B's ``${args_no_hyphens}``), which is exactly divebench's command-line
syntax, so every divebench key (``policy``, ``seeds``, ``divebatch.delta``, ...) can be
swept. ``shard`` needs no network: job ``i`` of an array of ``n`` runs every n-th item
of the (policy × seed) matrix, and ``divebench report`` merges the shards' folders.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def _value(text: Any) -> Any:
    """'0.1' -> 0.1, '64' -> 64, 'true' -> True, 'cosine' -> 'cosine' (YAML's own reading),
    so W&B sees numbers as numbers (parameter-importance charts need them)."""
    if not isinstance(text, str):
        return text
    try:
        v = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return v if isinstance(v, (int, float, bool, str)) and v is not None else text


def sweep_config(
    suite: str,
    entries: Sequence[str],
    seeds: Sequence[int],
    grid: Mapping[str, Sequence[Any]],
    project: str,
) -> dict[str, Any]:
    """The sweep as a dict: a grid over entries × seeds × ``grid`` (key -> values)."""
    if not entries:
        raise ValueError("a sweep needs at least one policy entry")
    if not seeds:
        raise ValueError("a sweep needs at least one seed")
    params: dict[str, Any] = {
        "suite": {"value": suite},
        "policy": {"values": list(entries)},
        # one seed per run: divebench's key is `seeds` (a list); a single value is a list of one
        "seeds": {"values": [int(s) for s in seeds]},
        "wandb_project": {"value": project},
    }
    for key, values in grid.items():
        if key in params:
            raise ValueError(
                f"grid key '{key}' is already a sweep parameter (policy, seeds, suite)"
            )
        vals = [_value(v) for v in values]
        if not vals:
            raise ValueError(f"grid key '{key}' has no values")
        params[key] = {"values": vals}
    return {
        "name": f"divebench-{suite}",
        "project": project,
        "method": "grid",
        "metric": {"name": "final_val_acc", "goal": "maximize"},
        "parameters": params,
        # the agent runs this in the project folder; args_no_hyphens gives key=value tokens
        "command": ["${env}", "divebench", "run", "${args_no_hyphens}"],
    }


def sweep_yaml(
    suite: str,
    entries: Sequence[str],
    seeds: Sequence[int],
    grid: Mapping[str, Sequence[Any]],
    project: str,
) -> str:
    """A W&B sweep file (YAML): ``wandb sweep FILE`` creates it, ``wandb agent ID`` runs it."""
    head = (
        f"# divebench sweep over suite {suite}: wandb sweep <this file>, then wandb agent <id>\n"
        "# each agent run is `divebench run key=value ...` with one value per parameter\n"
    )
    return head + yaml.safe_dump(
        sweep_config(suite, entries, seeds, grid, project), sort_keys=False
    )


_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def parse_shard(spec: str) -> tuple[int, int]:
    """'2/4' -> (2, 4); ValueError with a one-line message otherwise."""
    m = _SHARD.match(str(spec))
    if not m:
        raise ValueError(f"--shard must be i/n with 1 <= i <= n, got {spec!r}")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 1 <= i <= n:
        raise ValueError(f"--shard must be i/n with 1 <= i <= n, got {spec!r}")
    return i, n


def shard(matrix: Sequence[T], spec: str) -> list[T]:
    """Items ``i-1, i-1+n, i-1+2n, ...`` of ``matrix`` for ``--shard i/n`` (1-based ``i``).

    The n shards partition the matrix (every item in exactly one shard); dealing items
    round-robin spreads each policy's seeds over the jobs, so slow and fast policies mix.
    A shard may be empty when n exceeds the matrix size.
    """
    i, n = parse_shard(spec)
    return list(matrix[i - 1 :: n])
