"""Smith, Kindermans, Ying, Le 2018, "Don't decay the learning rate, increase the batch
size" (arXiv 1711.00489): every decay of the suite's LR schedule becomes a batch
increase by the same factor, until B_max; then the LR decays for what is left.

With the schedule's cumulative decay f_e = η(0)/η(e) at epoch e:

    B_e = min(round(B0·f_e), B_max),   LR_e = η(e)·B_e/B0,

so LR_e = η(0) while B can grow, and LR/B follows the schedule's η(e)/B0 throughout (the
noise scale of SGD, ε·N/B, that the paper keeps on the schedule). No gradient statistics.
With a constant schedule it is fixed-batch SGD.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from divebench.policies.common import resolve_max
from divebench.policy import Decision, Policy, PolicyConfig, PolicyState, SuiteContext


@dataclass
class SmithConfig(PolicyConfig):
    max_batch_size: int = 0  # 0 = the suite's max_batch_size

    def validate(self, ctx: SuiteContext) -> None:
        resolve_max(self.max_batch_size, ctx.max_batch_size, ctx.initial_batch_size, "smith")


def smith_decision(lr0: float, lr_e: float, b0: int, b_max: int) -> tuple[int, float]:
    """(B_e, LR multiplier) for base LRs η(0) = lr0 and η(e) = lr_e (module doc)."""
    factor = lr0 / lr_e if lr_e > 0 else float("inf")
    b = b_max if factor == float("inf") else int(min(max(round(b0 * factor), b0), b_max))
    return b, b / b0


class Smith(Policy):
    name = "smith"
    description = "Smith et al. 2018: turn each LR decay of the schedule into a batch increase"
    config_class = SmithConfig

    def __init__(self, config: SmithConfig, ctx: SuiteContext) -> None:  # type: ignore[override]
        super().__init__(config, ctx)
        self.b_max = resolve_max(config.max_batch_size, ctx.max_batch_size, ctx.initial_batch_size, "smith")

    def decide_epoch(self, state: PolicyState) -> Decision:
        b, mult = smith_decision(self.ctx.lr_at(0), self.ctx.lr_at(state.epoch),
                                 self.ctx.initial_batch_size, self.b_max)
        return Decision(b, mult, False)

    def state_dict(self) -> dict[str, Any]:
        return {}  # a pure function of the epoch
