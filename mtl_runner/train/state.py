"""What the trainer carries from step to step and hands to its callbacks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from mtl_runner.optim.jacobian import StepGradients


@dataclass
class EvalResult:
    losses: dict[str, float]
    metrics: dict[str, dict[str, float]]


@dataclass(frozen=True)
class StepOutcome:
    """One training step as callbacks see it. ``losses``: the observed task losses (under
    ddp those of the combined batch); ``applied``: False when the host knows the update
    was skipped; ``finite``: the device guard's verdict when the host does not know yet."""

    step: int
    losses: Tensor
    weights: Tensor
    grads: StepGradients
    applied: bool
    finite: Tensor | None


@dataclass
class FitState:
    """Counters that a checkpoint carries. ``batch_in_epoch`` > 0 marks a checkpoint taken
    mid-epoch: resuming replays that epoch's batch order from ``epoch_data_state`` and
    continues after the batches already trained on."""

    epoch: int = 0
    step: int = 0
    batch_in_epoch: int = 0
    epoch_data_state: Tensor | None = None
    epoch_loss_sum: Tensor | None = None
    epoch_batches: int = 0
    nonfinite_steps: int = 0
    consecutive_nonfinite: int = 0
    overflow_steps: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def last_step(self) -> int:
        """The index of the last completed step: epoch-level events are logged there, so a
        resume that purges events from its own first step on never drops them."""
        return self.step - 1
