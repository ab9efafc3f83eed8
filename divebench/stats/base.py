"""The statistics-provider interface: what the training loop calls, and when.

One provider instance lives for one run. The loop drives it like this (``measure`` is
the policy's decision for the epoch)::

    module = provider.wrap(model)            # once; the loop trains `module`
    for epoch ...:
        provider.start_epoch(measure, n)     # enable/disable the per-sample machinery
        for each logical batch of size B:
            k = max(ceil(B / max_micro_batch), provider.min_micro_batches(B) if measure else 1)
            for each micro-batch of size m (sizes sum to B):
                loss = criterion(module(x), y)           # mean over the m samples
                (loss * (m / B)).backward()              # p.grad accumulates the batch mean
                provider.after_micro_backward(m, m / B)  # per-sample work of this micro-batch
            provider.after_batch(B)          # p.grad now holds the batch's mean gradient
            optimizer.step()
        stats = provider.end_epoch()         # GradStats if the epoch was measured, else None

For a policy with ``stats_scope = "step"`` the epoch is started with ``measure=False``
and every step is bracketed instead::

            provider.start_step(measure)     # this step's decision; hooks on only if measured
            ... micro-batches as above (split only if measured) ...
            provider.after_batch(B)
            step_stats = provider.end_step(step)   # StepStats if measured, else None
            optimizer.step()

In step scope nothing is accumulated for the epoch (``end_epoch`` returns None).

Rules:
- Providers never change ``p.grad`` (the optimiser step must be identical with and
  without measurement) and never touch weight decay (``p.grad`` is read before the
  optimiser adds it).
- Sums are kept in float64. With a mean-reduced loss, B·ḡ_t = Σ_{i∈t} g_i for the actual
  size of batch t, so a ragged last batch enters with its true size.
- All of a provider's work is timed by the loop as training time; ``end_epoch`` also
  reports the provider's own time in ``GradStats.time_s``.
- ``state_dict`` / ``load_state_dict`` carry what is needed to resume mid-epoch.
"""

from __future__ import annotations

from typing import Any, Protocol

from torch import nn

from divebench.policy import GradStats, StepStats


class StatsProvider(Protocol):
    """Collects Σ||g_i||² and the gradient sum over a measured epoch."""

    name: str

    def wrap(self, model: nn.Module) -> nn.Module:
        """Prepare ``model`` (e.g. add Opacus hooks); return the module to train."""
        ...

    def min_micro_batches(self, batch_size: int) -> int:
        """How many micro-batches a measured logical batch must be split into (>= 1)."""
        ...

    def set_dist(self, dist: Any) -> None:
        """A data-parallel run (:mod:`divebench.distributed`): sum what each rank's slice
        contributes across ranks, or raise ``ValueError`` when the provider has no
        distributed definition."""
        ...

    def start_epoch(self, measure: bool, dataset_size: int) -> None:
        """Begin an epoch; when ``measure`` is False the provider must cost ~nothing."""
        ...

    def after_micro_backward(self, micro_size: int, loss_scale: float) -> None:
        """Called after each micro-batch backward; ``loss_scale`` multiplied its loss."""
        ...

    def abort_batch(self) -> None:
        """Forget what the current logical batch's micro-batches contributed (the loop
        redoes the batch with smaller micro-batches after an out-of-memory error)."""
        ...

    def after_batch(self, batch_size: int) -> None:
        """Called once per logical batch, after all micro-batches, before the step."""
        ...

    def start_step(self, measure: bool) -> None:
        """Step scope: whether the coming step is measured (raises ``ValueError`` for a
        provider without per-step statistics)."""
        ...

    def end_step(self, step: int) -> StepStats | None:
        """Step scope: the statistics of the step just done if it was measured, else None."""
        ...

    def end_epoch(self) -> GradStats | None:
        """Finish the epoch; the epoch's statistics if it was measured, else None."""
        ...

    def state_dict(self) -> dict[str, Any]:
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ...
