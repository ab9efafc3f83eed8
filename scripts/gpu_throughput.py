"""Images per second of each policy on CIFAR-shaped fake data, ResNet-18, batch 128
and 2048, through `divebench run` (one table). Part of scripts/gpu_check.sh.

Each cell is the second epoch's samples / epoch_train_time_s (the first epoch carries
cudnn autotuning). `divebatch` measures every epoch (exact per-sample norms) - the
worst case; `divebatch-epoch` uses the no-per-sample estimator.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

CASES = {
    "sgd": ["policy=sgd"],
    "adabatch": ["policy=adabatch", "adabatch.resize_freq=1000"],
    "divebatch": ["policy=divebatch", "divebatch.resize_freq=1", "divebatch.delta=1e-9"],
    "divebatch-epoch": ["policy=divebatch", "divebatch.resize_freq=1", "divebatch.delta=1e-9",
                        "divebatch.estimator=epoch"],
}


def main() -> int:
    amp = sys.argv[1] if len(sys.argv) > 1 else "off"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for batch in (128, 2048):
            for name, args in CASES.items():
                out = Path(tmp) / f"{name}-{batch}"
                cmd = ["divebench", "run", "suite=cifar10", "data=fake", "subset=16384", "epochs=2", "seeds=1",
                       "device=cuda", f"amp={amp}", f"batch_size={batch}", "max_batch_size=4096",
                       f"results_dir={out}", "wandb=off", "--no-report", "-q", *args]
                subprocess.run(cmd, check=True)
                (run,) = (out / "cifar10").iterdir()
                last = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][-1]
                ips = 16384 / last["epoch_train_time_s"]
                rows.append((name, batch, ips, last["peak_memory_mb"], last["measured"]))
    print(f"\nResNet-18, CIFAR-shaped fake data, amp={amp}: images/s (2nd epoch, training time only)")
    print(f"{'policy':<16} {'batch':>6} {'images/s':>10} {'peak MB':>9} measured")
    for name, batch, ips, mem, measured in rows:
        print(f"{name:<16} {batch:>6} {ips:>10.0f} {mem:>9.0f} {measured}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
