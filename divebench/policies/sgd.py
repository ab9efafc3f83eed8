"""Fixed-batch SGD: one batch size for the whole run, the suite's LR schedule."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from divebench.policies.common import LrScaling, lr_scale
from divebench.policy import Decision, Policy, PolicyConfig, PolicyState, SuiteContext


@dataclass
class SGDConfig(PolicyConfig):
    batch_size: int = 0  # 0 = the suite's batch_size (B0); sgd-large sets ${max_batch_size}
    lr_scaling: LrScaling = "none"  # relative to the suite's B0: linear = B/B0 ("linear rescale" rows)
    lr_decay: float = 1.0  # extra LR factor applied every `decay_every` epochs (AdaBatch-original baseline: 0.375)
    decay_every: int = 0  # 0 = never

    def validate(self, ctx: SuiteContext) -> None:
        if self.batch_size < 0:
            raise ValueError(f"sgd.batch_size={self.batch_size} is not valid: expected an int >= 1 (0 = the suite's batch_size)")
        if not self.lr_decay > 0:
            raise ValueError(f"sgd.lr_decay={self.lr_decay} is not valid: expected a number > 0")
        if self.decay_every < 0:
            raise ValueError(f"sgd.decay_every={self.decay_every} is not valid: expected an int >= 0")


class FixedSGD(Policy):
    name = "sgd"
    description = "Fixed-batch SGD: constant batch size, the suite's LR schedule"
    config_class = SGDConfig

    def __init__(self, config: SGDConfig, ctx: SuiteContext) -> None:  # type: ignore[override]
        super().__init__(config, ctx)
        self.cfg = config
        self.batch_size = config.batch_size or ctx.initial_batch_size

    def decide_epoch(self, state: PolicyState) -> Decision:
        mult = lr_scale(self.cfg.lr_scaling, self.batch_size, self.ctx.initial_batch_size)
        if self.cfg.decay_every:
            mult *= self.cfg.lr_decay ** (state.epoch // self.cfg.decay_every)
        return Decision(self.batch_size, mult, False)

    def state_dict(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batch_size = int(state["batch_size"])
