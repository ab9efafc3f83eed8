"""A batch-size policy plugin: grow B geometrically from B0 to B_max over the run.

B_e = B0 · (B_max/B0)^(e / (epochs-1)), rounded down, refreshed every ``every`` epochs.
It needs no gradient statistics, so divebench builds none for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from divebench.hookspecs import hookimpl
from divebench.policy import Decision, Policy, PolicyConfig, PolicyState, SuiteContext


@dataclass
class RampConfig(PolicyConfig):
    every: int = 1  # epochs between batch-size updates
    lr_follows: bool = False  # multiply the LR by B/B0 (linear scaling) when True

    def validate(self, ctx: SuiteContext) -> None:
        if self.every < 1:
            raise ValueError(f"ramp.every={self.every} is not valid: expected an int >= 1")


class Ramp(Policy):
    name = "ramp"
    description = "Geometric ramp of the batch size from B0 to B_max over the run (example plugin)"
    config_class = RampConfig

    def __init__(self, config: RampConfig, ctx: SuiteContext) -> None:
        super().__init__(config, ctx)
        self.cfg = config

    def batch_size_at(self, epoch: int) -> int:
        b0, bmax, epochs = self.ctx.initial_batch_size, self.ctx.max_batch_size, self.ctx.epochs
        e = (epoch // self.cfg.every) * self.cfg.every
        frac = e / max(epochs - 1, 1)
        return max(b0, min(bmax, int(b0 * (bmax / b0) ** frac + 1e-9)))

    def decide_epoch(self, state: PolicyState) -> Decision:
        b = self.batch_size_at(state.epoch)
        mult = b / self.ctx.initial_batch_size if self.cfg.lr_follows else 1.0
        return Decision(batch_size=b, lr_multiplier=mult, measure=False)

    def state_dict(self) -> dict[str, Any]:
        return {}  # a pure function of the epoch: nothing to checkpoint


@hookimpl
def divebench_policies() -> list[type[Policy]]:
    return [Ramp]
