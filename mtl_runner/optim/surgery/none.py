"""``surgery=none``: the plain sum of task gradients (the engine's single-backward fast path)."""

from __future__ import annotations

import torch
from torch import Tensor

from mtl_runner.optim.surgery.base import GramianWeighting


class NoSurgery(GramianWeighting):
    """``d = sum_t g_t``. The engine skips the Jacobian entirely when this is selected,
    unless something else in the step (a diagnostics step, a gradient-based balancer)
    already needs per-task gradients."""

    #: No surgery.task_subset: a plain step is already one backward, nothing to save.
    allows_task_subset = False

    needs_jacobian = False

    def solve(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        return torch.ones(gramian.shape[0], dtype=gramian.dtype, device=gramian.device)

    def direction(
        self, jacobian: Tensor, losses: Tensor | None = None, row_scale: Tensor | None = None, *, read_flags: bool = False
    ) -> Tensor:
        """The weighted sum, reporting no ``last_weights``: "no surgery" has no effective
        weights of its own, so a diagnostics step (which takes this path) must not log
        ``surgery_weight/<task>`` where the other steps of the run do not."""
        direction = super().direction(jacobian, losses, row_scale, read_flags=read_flags)
        self.last_weights = None
        return direction

    def __call__(self, jacobian: Tensor, losses: Tensor | None = None) -> Tensor:
        self.last_weights = None
        # Like every other method, a row with a non-finite entry is dropped.
        finite = torch.isfinite(jacobian).all(1, keepdim=True)
        return torch.where(finite, jacobian, torch.zeros_like(jacobian)).sum(0)
