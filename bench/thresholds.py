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
}


def threshold(name: str) -> float:
    """The gate's threshold (KeyError names the gate if it was never registered)."""
    return THRESHOLDS[name][0]
