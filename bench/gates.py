"""The timing method every same-run ratio gate of bench/ shares.

A gate times a subject and a reference in this process, interleaved ABBA (so a slow
drift of the machine's load hits both sides alike) after one untimed warm-up of each.
Its ratio is the median over ABBA blocks of (A + A') / (B + B'): each block holds one
pair run subject-first and one run reference-first, so an order effect cancels. (The
median of single pairs did not: the statistics gate on the CIFAR CNN at batch 512 gave
paired ratios of 0.89-0.91 subject-first and 1.11-1.14 reference-first, and with an
odd number of pairs the median fell in whichever order had one pair more.) A gate that fails is measured
again, ``reps`` more pairs at a time up to ``max_rounds`` rounds, and judged on the
median over all pairs: a real slowdown stays above the threshold, a burst of load from
other processes is outvoted.

Timer: CPU time of this process (``time.process_time``, user + system) with torch on one
thread. On the shared 2-core development machine the wall time of one repetition moved
5× with the neighbours' load, while the CPU time a process spends is what it does
itself; one thread keeps OpenMP's spin-waiting (whose CPU cost also depends on the
neighbours) out of the count. CPU time misses work that waits (a sleep, a blocking
write, a device synchronisation), so a gate may also limit the same pairs' wall-time
ratio (``wall_limit``), loosely, since the neighbours move wall time by tens of percent.

Each side is a callable returning its own ``Timing`` (CPU seconds, wall seconds), so a
side can time just the part it is about (the harness's training region, say);
:func:`timed` makes one from a plain callable.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from thresholds import THRESHOLDS  # bench/ (no __init__.py) is on sys.path under pytest

Timing = tuple[float, float]  # (CPU seconds, wall seconds) of one side's timed work


@dataclass
class GateResult:
    """One ratio gate's outcome: medians of the paired subject/reference ratios of CPU
    time (gated by ``threshold``) and of wall time (gated by ``wall_limit`` when set)."""

    name: str
    ratio: float
    threshold: float
    wall_ratio: float
    wall_limit: float | None
    subject_s: list[float]  # CPU seconds
    reference_s: list[float]
    subject_wall_s: list[float]
    reference_wall_s: list[float]

    @property
    def passed(self) -> bool:
        wall_ok = self.wall_limit is None or self.wall_ratio <= self.wall_limit
        return self.ratio <= self.threshold and wall_ok

    def message(self) -> str:
        verdict = "ok" if self.passed else "FAILED"
        wall = (f"wall-time ratio {self.wall_ratio:.3f} (limit {self.wall_limit:.2f})"
                if self.wall_limit is not None else f"wall-time ratio {self.wall_ratio:.3f} (not gated)")
        return (
            f"gate {self.name}: {verdict}: CPU-time ratio {self.ratio:.3f} (threshold {self.threshold:.2f}), "
            f"{wall}; subject median {statistics.median(self.subject_s):.4f} s CPU, "
            f"reference median {statistics.median(self.reference_s):.4f} s CPU, "
            f"over {len(self.subject_s)} interleaved pairs; ABBA-block CPU ratios "
            f"{sorted(round(r, 3) for r in block_ratios(self.subject_s, self.reference_s))}"
        )

    def info(self) -> dict[str, Any]:
        """For pytest-benchmark's extra_info (kept with the absolute timings)."""
        return {
            "gate": self.name, "ratio": self.ratio, "threshold": self.threshold,
            "wall_ratio": self.wall_ratio, "wall_limit": self.wall_limit, "passed": self.passed,
            "subject_cpu_s": self.subject_s, "reference_cpu_s": self.reference_s,
            "subject_wall_s": self.subject_wall_s, "reference_wall_s": self.reference_wall_s,
        }


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread for the block (the gates' timing condition)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def timed(fn: Callable[[], object]) -> Callable[[], Timing]:
    """``fn`` as a gate side: runs it and returns its (CPU, wall) seconds."""

    def side() -> Timing:
        c0, w0 = time.process_time(), time.perf_counter()
        fn()
        return time.process_time() - c0, time.perf_counter() - w0

    return side


def block_ratios(a: list[float], b: list[float]) -> list[float]:
    """(a[i] + a[i+1]) / (b[i] + b[i+1]) for each ABBA block (pairs i, i+1)."""
    if len(a) != len(b) or len(a) % 2:
        raise ValueError(f"ABBA blocks need an even number of pairs, got {len(a)} and {len(b)}")
    return [(a[i] + a[i + 1]) / (b[i] + b[i + 1]) for i in range(0, len(a), 2)]


def median_ratio(a: list[float], b: list[float]) -> float:
    """The gate's ratio: the median of the ABBA blocks' ratios."""
    return statistics.median(block_ratios(a, b))


def paired_ratio(
    name: str, subject: Callable[[], Timing], reference: Callable[[], Timing], reps: int, *,
    threshold: float | None = None, wall_limit: float | None = None, max_rounds: int = 3,
    conditions: Callable[[], AbstractContextManager[None]] = one_thread,
) -> GateResult:
    """Time ``subject`` against ``reference`` as the module doc says (``reps`` pairs per
    round, even: ABBA blocks); the threshold is ``THRESHOLDS[name]`` unless given.
    ``conditions`` sets up the timing (one thread)."""
    if reps < 2 or reps % 2:
        raise ValueError(f"reps={reps}: a gate needs an even number of pairs >= 2 (ABBA blocks)")
    limit = THRESHOLDS[name][0] if threshold is None else threshold
    with conditions():
        subject()
        reference()
        subj: list[Timing] = []
        ref: list[Timing] = []
        for _ in range(max_rounds):
            for r in range(reps):
                gc.collect()  # a collection triggered by one side must not land in the other
                if r % 2 == 0:
                    s, f = subject(), reference()
                else:
                    f, s = reference(), subject()
                subj.append(s)
                ref.append(f)
            cpu_s, cpu_r = [t[0] for t in subj], [t[0] for t in ref]
            wall_s, wall_r = [t[1] for t in subj], [t[1] for t in ref]
            result = GateResult(name, median_ratio(cpu_s, cpu_r), limit, median_ratio(wall_s, wall_r),
                                wall_limit, cpu_s, cpu_r, wall_s, wall_r)
            if result.passed:
                break
    return result


def run_gate(benchmark: Any, gate: Callable[..., GateResult], *args: Any) -> GateResult:
    """Run ``gate(*args)`` once under pytest-benchmark, keep its ratios with the timings
    (``extra_info``) and print its message; the caller asserts ``result.passed``."""
    result = benchmark.pedantic(gate, args=args, rounds=1, iterations=1)
    benchmark.extra_info.update(result.info())
    print(result.message())
    return result
