"""The loop-overhead gate of bench/ can fail: a training loop made slower on purpose,
by extra work or by waiting, trips it (the same gate function the benchmark calls)."""

from __future__ import annotations

import importlib.util
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import divebench.loop

BENCH = Path(__file__).resolve().parent.parent / "bench"
SLOWDOWN = 2.0  # added per batch: twice what the batch's own forward/backward took, so the
# loop's share of the time triples whatever the machine's speed (a fixed delay of 2 ms gave
# 1.9x here and only 1.45x on a slower CI machine)


@pytest.fixture(scope="module")
def gates() -> Iterator[ModuleType]:
    """bench/test_bench_loop.py, imported as the benchmark run imports it."""
    if not (BENCH / "test_bench_loop.py").exists():
        pytest.skip("no bench/ folder (not a source checkout)")
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_loop_gates", BENCH / "test_bench_loop.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("bench_loop_gates", None)
        sys.path.remove(str(BENCH))


def slowed(how: str) -> Any:
    """divebench.loop's per-batch forward/backward, then SLOWDOWN times its own duration
    of CPU work (process time) or of waiting (wall time)."""
    original = divebench.loop._batch_with_oom_retry

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        cpu0, wall0 = time.process_time(), time.perf_counter()
        out = original(*args, **kwargs)
        if how == "work":
            end = time.process_time() + SLOWDOWN * (time.process_time() - cpu0)
            while time.process_time() < end:
                pass
        else:
            time.sleep(SLOWDOWN * (time.perf_counter() - wall0))
        return out

    return wrapper


def small_gate(gates: ModuleType, tmp_path: Path) -> Any:
    # a short version of loop_overhead_b32 (800 training samples, 25 steps an epoch)
    return gates.loop_overhead_gate(tmp_path, batch_size=32, epochs=1, reps=4, n_samples=1000,
                                    name="loop_overhead_b32", max_rounds=1)


def test_extra_work_in_the_loop_fails_the_gate(gates: ModuleType, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(divebench.loop, "_batch_with_oom_retry", slowed("work"))
    result = small_gate(gates, tmp_path)
    assert not result.passed
    # far beyond the short gate's own noise (1.0-1.15 unpatched): the slowdown was measured
    assert result.ratio > 1.5
    assert result.message().startswith("gate loop_overhead_b32: FAILED: CPU-time ratio")


def test_waiting_in_the_loop_fails_the_gate(gates: ModuleType, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A sleep costs no CPU time: the wall-time ratio of the same pairs catches it."""
    monkeypatch.setattr(divebench.loop, "_batch_with_oom_retry", slowed("sleep"))
    result = small_gate(gates, tmp_path)
    assert not result.passed
    assert result.wall_ratio > max(result.wall_limit, 1.5)
    assert "FAILED" in result.message()


def test_an_order_effect_within_pairs_cancels(gates: ModuleType) -> None:
    """Sides of equal cost where whichever runs second takes 20 % less: the gate's
    ratio is 1 (the median of single pairs would say 1.25 or 0.8 for an odd pair count)."""
    import gates as shared  # bench/gates.py, on sys.path while the fixture is active

    last: list[str] = []

    def side(name: str) -> Any:
        def run() -> tuple[float, float]:
            second = bool(last) and last[-1] != name and len(last) % 2 == 1
            last.append(name)
            t = 0.8 if second else 1.0
            return t, t

        return run

    result = shared.paired_ratio("loop_overhead_b32", side("subject"), side("reference"), reps=6, max_rounds=1,
                                 wall_limit=1.3)
    assert result.ratio == pytest.approx(1.0) and result.passed
    single = sorted(a / b for a, b in zip(result.subject_s, result.reference_s, strict=True))
    assert single[0] == pytest.approx(0.8) and single[-1] == pytest.approx(1.25)
    with pytest.raises(ValueError, match="even number of pairs"):
        shared.paired_ratio("loop_overhead_b32", side("subject"), side("reference"), reps=5)
