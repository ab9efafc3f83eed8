"""Same-run ratio gate on the memory layout the engine picks for image models on CPU.

``divebench.engine`` trains image models (3-D inputs) in channels_last on every device,
CPU included. This gate keeps that choice honest: one SGD training step of the CIFAR
ResNet-18 (the cifar10/cifar100 suites' model, 32×32 inputs) in channels_last against
the same step in NCHW, from the same weights on the same batch, timed as
bench/gates.py times (CPU time, one thread, ABBA pairs). It fails when channels_last
becomes clearly slower than NCHW (threshold 1.05, above the noise), e.g. after a torch
upgrade changes oneDNN's kernels; then the engine's choice should change with it.

``layout_channels_last_step``: a plain step (forward, backward, SGD with momentum).
``layout_channels_last_measured_step``: the same step with the ``exact`` statistics
provider measuring (DiveBatch's measurement epochs), whose per-sample hooks see the
activations in the model's layout.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from gates import paired_ratio, run_gate, timed  # bench/ is on sys.path under pytest
from torch import nn

from divebench.models.resnet import build_resnet18_cifar
from divebench.stats import make_provider
from divebench.stats.reference import drive_epoch

BATCH = 32
REPS = 6  # pairs; a CPU step of ResNet-18 at B=32 takes about a second on one thread


def make_step(layout: str, measure: bool) -> Callable[[], None]:
    """One training step (a one-batch epoch) of a fresh ResNet-18 copy in ``layout``."""
    torch.manual_seed(0)
    model: nn.Module = build_resnet18_cifar(10, (3, 32, 32), {})
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (BATCH,), generator=gen)
    if layout == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    provider = make_provider("exact")
    module = provider.wrap(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        (stats,) = drive_epoch(provider, module, opt, x, y, BATCH, measure=measure)
        if measure:
            assert stats is not None and stats.sum_sq_norms > 0

    return step


# both `full`: CI (-m "not full") leaves the layout choice to `pytest bench` on a quiet machine
@pytest.mark.full
@pytest.mark.parametrize("measure", [False, True], ids=["plain", "measured"])
def test_channels_last_step_is_not_slower_on_cpu(benchmark: Any, measure: bool) -> None:
    name = "layout_channels_last_measured_step" if measure else "layout_channels_last_step"
    subject = timed(make_step("channels_last", measure))
    reference = timed(make_step("contiguous", measure))
    result = run_gate(benchmark, paired_ratio, name, subject, reference, REPS)
    assert result.passed, result.message()
