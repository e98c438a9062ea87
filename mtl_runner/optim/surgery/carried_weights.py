"""Convex task weights carried from one training step to the next.

sdmgrad, modo and moco do not solve their weight subproblem each step: they take a few
projected-gradient steps from the last step's weights. Those weights are the method's
state, so that a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mtl_runner.errors import option_name
from mtl_runner.optim.surgery.base import Surgery


class CarriedSimplexWeights(Surgery):
    """Mixin (listed before the method's base class): ``simplex_weights`` start at
    ``1/T`` in :meth:`setup` and are saved in the state dict next to the base class's
    state. A method reads them with :meth:`carried_weights` and stores its update back."""

    #: No surgery.task_subset: the per-task simplex weights are carried across steps.
    allows_task_subset = False

    simplex_weights: Tensor | None = None

    def setup(self, num_tasks: int, generator: torch.Generator | None) -> None:
        super().setup(num_tasks, generator)
        self.simplex_weights = torch.full((num_tasks,), 1 / num_tasks)

    def state_dict(self) -> dict[str, Any]:
        weights = self.simplex_weights
        return {**super().state_dict(), "simplex_weights": None if weights is None else weights.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        weights = state["simplex_weights"]
        self.simplex_weights = None if weights is None else weights.clone()

    def carried_weights(self, num_tasks: int, like: Tensor) -> Tensor:
        """The last step's weights on ``like``'s device and dtype (a checkpoint brings
        them back on the CPU)."""
        weights = self.simplex_weights
        if weights is None or weights.shape != (num_tasks,):
            name = option_name(self)
            set_up_for = None if weights is None else weights.shape[0]
            raise ValueError(
                f"surgery={name} was set up for {set_up_for} tasks but got {num_tasks}: call setup(num_tasks, generator) first"
            )
        return weights.to(device=like.device, dtype=like.dtype)
