"""AdaBatch (Devarakonda, Naumov, Garland, arXiv 1712.02029): double the batch size
every ``resize_freq`` epochs.

- ``variant=paper`` (as re-implemented for the DiveBatch tables): B_e = min(B0·2^⌊e/rf⌋,
  B_max) on top of the suite's base LR schedule, LR multiplied per ``lr_scaling``.
- ``variant=original``: at every doubling the LR is multiplied by ``original_decay``
  (0.75), as in Devarakonda et al.; the matching fixed-batch baseline is
  ``sgd sgd.lr_decay=0.375 sgd.decay_every=<resize_freq>`` with a constant base schedule,
  so that LR/B follows the baseline's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from divebench.policies.common import LrScaling, check_positive, lr_scale, resolve_max
from divebench.policy import Decision, Policy, PolicyConfig, PolicyState, SuiteContext


@dataclass
class AdaBatchConfig(PolicyConfig):
    resize_freq: int = 20  # epochs between doublings
    max_batch_size: int = 0  # 0 = the suite's max_batch_size
    variant: Literal["paper", "original"] = "paper"
    lr_scaling: LrScaling = "none"  # variant=paper only
    original_decay: float = 0.75  # variant=original: LR factor at each doubling

    def validate(self, ctx: SuiteContext) -> None:
        if self.resize_freq < 1:
            raise ValueError(f"adabatch.resize_freq={self.resize_freq} is not valid: expected an int >= 1")
        check_positive("adabatch.original_decay", self.original_decay)
        resolve_max(self.max_batch_size, ctx.max_batch_size, ctx.initial_batch_size, "adabatch")


class AdaBatch(Policy):
    name = "adabatch"
    description = "AdaBatch: double the batch every resize_freq epochs up to B_max"
    config_class = AdaBatchConfig

    def __init__(self, config: AdaBatchConfig, ctx: SuiteContext) -> None:  # type: ignore[override]
        super().__init__(config, ctx)
        self.cfg = config
        self.b_max = resolve_max(config.max_batch_size, ctx.max_batch_size, ctx.initial_batch_size, "adabatch")

    def batch_size_at(self, epoch: int) -> int:
        return min(self.ctx.initial_batch_size * 2 ** (epoch // self.cfg.resize_freq), self.b_max)

    def decide_epoch(self, state: PolicyState) -> Decision:
        b = self.batch_size_at(state.epoch)
        if self.cfg.variant == "original":
            doublings = 0
            while self.ctx.initial_batch_size * 2 ** (doublings + 1) <= b:
                doublings += 1
            return Decision(b, self.cfg.original_decay**doublings, False)
        return Decision(b, lr_scale(self.cfg.lr_scaling, b, self.ctx.initial_batch_size), False)

    def state_dict(self) -> dict[str, Any]:
        return {}  # a pure function of the epoch
