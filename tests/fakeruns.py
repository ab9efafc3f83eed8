"""Hand-made run folders in the on-disk format of results.py, for scoring and report tests.

``make_run`` writes config.yaml, env.json, metrics.jsonl and summary.json exactly as a
real run would (one JSON row per epoch, cumulative times and counters), from per-epoch
accuracies and per-epoch training times chosen by the test.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml


def make_run(
    results_dir: Path,
    suite: str,
    entry: str,
    seed: int,
    val_acc: Sequence[float],
    epoch_time_s: Sequence[float] | float = 1.0,
    batch_sizes: Sequence[int] | int = 32,
    n_train: int = 1000,
    policy: str | None = None,
    status: str = "complete",
    target_accuracy: float = 0.0,
    baseline: str = "",
    lr: Sequence[float] | float = 0.1,
    n_grad_diversity: Sequence[float | None] | None = None,
    stamp: str = "20250101T000000",
    summary: bool = True,
    extra_config: dict[str, Any] | None = None,
) -> Path:
    """Write one run folder and return its path."""
    epochs = len(val_acc)
    times = (
        [float(epoch_time_s)] * epochs
        if isinstance(epoch_time_s, (int, float))
        else list(epoch_time_s)
    )
    bss = [int(batch_sizes)] * epochs if isinstance(batch_sizes, int) else list(batch_sizes)
    lrs = [float(lr)] * epochs if isinstance(lr, (int, float)) else list(lr)
    gd = list(n_grad_diversity) if n_grad_diversity is not None else [None] * epochs
    run_id = f"{entry}-s{seed}-{stamp}-{seed:06x}"
    path = Path(results_dir) / suite / run_id
    path.mkdir(parents=True)
    config = {
        "suite": suite,
        "entry": entry,
        "policy_name": policy or entry.split("-")[0],
        "policy_config": {},
        "seed": seed,
        "epochs": epochs,
        "batch_size": bss[0],
        "max_batch_size": max(bss),
        "lr": lrs[0],
        "target_accuracy": target_accuracy,
        "baseline": baseline,
        "dataset": "synthetic",
        "model": "logreg",
        "device": "cpu",
        "policy": entry,
        **(extra_config or {}),
    }
    (path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (path / "env.json").write_text(
        json.dumps(
            {
                "python": "3.11.7",
                "torch": "2.14.1",
                "cuda": None,
                "device_name": "x86_64",
                "git_sha": "abc123",
                "git_dirty": False,
                "plugins": {},
                "hostname": "test",
                "cpu": "x86_64",
                # runs start in the suite's entry order: the report lists entries in that order
                "started_utc": datetime.strptime(stamp, "%Y%m%dT%H%M%S").isoformat() + "+00:00",
            }
        )
    )
    rows = []
    step = samples = 0
    cum = 0.0
    for e in range(epochs):
        bs = bss[e]
        step += math.ceil(n_train / bs)
        samples += n_train
        cum += times[e]
        rows.append(
            {
                "epoch": e + 1,
                "step": step,
                "samples_seen": samples,
                "batch_size": bs,
                "lr": lrs[e],
                "lr_multiplier": 1.0,
                "train_loss": 1.0 - val_acc[e],
                "train_acc": val_acc[e],
                "val_loss": 1.0 - val_acc[e],
                "val_acc": val_acc[e],
                "train_time_s": cum,
                "epoch_train_time_s": times[e],
                "eval_time_s": 0.1 * (e + 1),
                "other_time_s": 0.0,
                "wall_time_s": cum + 0.1 * (e + 1),
                "measured": gd[e] is not None,
                "grad_diversity": None if gd[e] is None else gd[e] / n_train,
                "n_grad_diversity": gd[e],
                "stats_time_s": 0.0 if gd[e] is None else 0.01,
                "peak_memory_mb": 10.0 + bs / 32,
            }
        )
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if summary:
        accs = [a for a in val_acc]
        (path / "summary.json").write_text(
            json.dumps(
                {
                    "run_id": run_id,
                    "suite": suite,
                    "entry": entry,
                    "policy": config["policy_name"],
                    "seed": seed,
                    "status": status,
                    "epochs_completed": epochs,
                    "final_val_acc": accs[-1] if accs else None,
                    "best_val_acc": max(accs) if accs else None,
                    "train_time_s": cum,
                    "wall_time_s": cum + 0.1 * epochs,
                    "steps": step,
                    "samples_seen": samples,
                    "error": None,
                    "wandb": None,
                }
            )
        )
    return path
