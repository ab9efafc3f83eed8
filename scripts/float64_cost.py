"""What `dtype=float64` costs on CPU: one training step (forward, backward, SGD update)
in float64 against float32, side by side in one process, for the models of the suites.

    python scripts/float64_cost.py [--threads 1] [--batch 32] [--reps 5]

Prints, per model, the median float32 and float64 step time (CPU time of this process)
and their ratio, over ABAB-interleaved repetitions so that drift hits both sides.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from divebench.models.resnet import build_resnet18_cifar
from divebench.models.small import build_mlp, build_mnist1d_cnn, build_small_cnn

MODELS: dict[str, tuple[Callable[..., nn.Module], tuple[int, ...], int]] = {
    "mlp (synthetic)": (build_mlp, (32,), 10),
    "mnist1d_cnn (mnist1d)": (build_mnist1d_cnn, (1, 40), 10),
    "small_cnn (BatchNorm, 32x32)": (build_small_cnn, (3, 32, 32), 10),
    "resnet18_cifar (cifar10)": (build_resnet18_cifar, (3, 32, 32), 10),
}


def step_time(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    t0 = time.process_time()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return (time.process_time() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, ATen CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{args.threads} thread(s), B={args.batch}")
    for name, (build, shape, classes) in MODELS.items():
        torch.manual_seed(0)
        sides = {}
        for dtype in (torch.float32, torch.float64):
            model = build(classes, shape, {}).to(dtype)
            x = torch.randn(args.batch, *shape, dtype=dtype)
            y = torch.randint(0, classes, (args.batch,))
            steps = max(1, int(0.5 / max(step_time(model, x, y, 1), 1e-4)))  # ~0.5 s a side
            sides[dtype] = (model, x, y, steps)
        times: dict[torch.dtype, list[float]] = {torch.float32: [], torch.float64: []}
        for rep in range(args.reps):
            order = (torch.float32, torch.float64) if rep % 2 == 0 else (torch.float64, torch.float32)
            for dtype in order:
                model, x, y, steps = sides[dtype]
                times[dtype].append(step_time(model, x, y, steps))
        t32, t64 = statistics.median(times[torch.float32]), statistics.median(times[torch.float64])
        ratios = [b / a for a, b in zip(times[torch.float32], times[torch.float64], strict=True)]
        print(f"{name:30s} float32 {t32 * 1e3:8.2f} ms  float64 {t64 * 1e3:8.2f} ms  "
              f"ratio {t64 / t32:5.2f}x (per rep {min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
