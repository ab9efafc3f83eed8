"""Every same-run ratio gate of bench/ in one place.

``THRESHOLDS[name] = (threshold, measured, "YYYY-MM-DD")``: a benchmark fails when its
ratio (subject time / reference time, both timed in the same process) exceeds
``threshold``. ``measured`` is the ratio last seen on the development machine (2-core
AMD EPYC, torch 2.14.1, CPU) on that date: it tells a reviewer how much head-room a
gate has. Change a threshold only with a reason in the commit message.
"""

from __future__ import annotations

THRESHOLDS: dict[str, tuple[float, float, str]] = {
    # harness loop (divebench.loop.train via engine.run_one, sgd, no provider) vs a bare
    # PyTorch loop doing the same steps on the same model/data/order: train time ratio
    "loop_overhead_b32": (1.05, 0.0, "2026-11-29"),
    "loop_overhead_b256": (1.05, 0.0, "2026-11-29"),
    # an epoch outside measurement vs an sgd epoch at the same batch size (B=32)
    "adabatch_epoch_vs_sgd": (1.03, 0.0, "2026-11-29"),
    "divebatch_unmeasured_epoch_vs_sgd": (1.03, 0.0, "2026-11-29"),
    # a speed-up, so the gate is a floor: fails when the ratio is BELOW the threshold.
    # images/s of the device-resident CIFAR-10 pipeline (uint8 on the device, batched
    # crop/flip/normalise) over a torchvision DataLoader (2 workers, PIL transforms);
    # wall time (the DataLoader works in other processes). Three runs on the loaded
    # development machine gave 11.5x, 15.5x and 20.5x; the median is recorded.
    "pipeline_vs_dataloader": (5.0, 15.5, "2026-11-29"),
}


def threshold(name: str) -> float:
    """The gate's threshold (KeyError names the gate if it was never registered)."""
    return THRESHOLDS[name][0]
