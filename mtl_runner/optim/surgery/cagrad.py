"""``surgery=cagrad``: conflict-averse gradient descent (Liu, Liu, Jin, Stone, Liu,
"Conflict-Averse Gradient Descent for Multi-task Learning", NeurIPS 2021)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from mtl_runner.optim.surgery.base import GramianWeighting, Space
from mtl_runner.optim.surgery.simplex import cagrad_weights, support_of


class CAGrad(GramianWeighting):
    """``g0 = mean_t g_t``; ``w* = argmin_{w in simplex} g_w . g0 + c ||g0|| ||g_w||``;
    ``d = g0 + (c ||g0|| / ||g_w*||) g_w*``, divided by ``1 + c^2`` (``rescale=1``), by
    ``1 + c`` (``rescale=2``) or not at all (``rescale=0``), as in the authors' code.

    A re-weighting of the rows: ``d = sum_t (1/T + lambda w*_t) g_t``. The simplex
    problem is solved in torch (exactly up to 12 tasks, see :mod:`simplex`), not with the
    reference code's host-side SciPy SLSQP. ``c = 0`` gives the mean.

    Scale: the reference code returns the mean-scale direction above; here it is
    multiplied by ``T`` (docs/methods.md's convention), so ``c = 0`` returns ``J.sum(0)``.
    """

    def __init__(
        self, c: float = 0.4, rescale: Literal[0, 1, 2] = 1, space: Space = "params", task_subset: int | None = None
    ) -> None:
        if not 0 <= c < 1:
            raise ValueError(f"surgery.c must be in [0, 1), got {c!r}")
        if rescale not in (0, 1, 2):
            raise ValueError(f"surgery.rescale must be 0, 1 or 2, got {rescale!r}")
        super().__init__(space, task_subset)
        self.c = c
        self.rescale = rescale

    def solve(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        num_tasks = gramian.shape[0]
        mean = torch.full((num_tasks,), 1 / num_tasks, dtype=gramian.dtype, device=gramian.device)
        radius = self.c * (mean @ gramian @ mean).clamp_min(0).sqrt()  # c ||g0||
        w = cagrad_weights(gramian, radius, self.hint(tuple(mean.shape)))
        self.support = support_of(w)
        norm_gw = (w @ gramian @ w).clamp_min(0).sqrt()
        step = torch.where(norm_gw > 0, radius / torch.where(norm_gw > 0, norm_gw, 1), 0)
        divisor = {0: 1.0, 1: 1 + self.c**2, 2: 1 + self.c}[self.rescale]
        return num_tasks * (mean + step * w) / divisor
