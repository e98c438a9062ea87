"""``surgery=pcgrad``: projecting conflicting gradients (Yu et al., "Gradient Surgery for
Multi-Task Learning", NeurIPS 2020, Algorithm 1)."""

from __future__ import annotations

import torch
from torch import Tensor

from mtl_runner.optim.surgery.base import GramianWeighting


class PCGrad(GramianWeighting):
    """For each task ``i``, ``g_i'`` starts at ``g_i`` and, for every other task ``j`` in a
    random order, loses its component along ``g_j`` when ``g_i' . g_j < 0``;
    ``d = sum_i g_i'``.

    Every ``g_i'`` stays a combination of the rows, so the method tracks coefficients
    ``C`` (``g_i' = C_i @ J``) and only needs the Gramian: ``g_i' . g_j = (C_i @ M)_j``.
    All ``i`` are projected at once, one position of their orders at a time. The orders
    (an independent permutation of the other tasks per ``i``, as in docs/methods.md) come from
    the run's seeded generator. Scale: the paper's sum of projected gradients, which is
    the project's convention (``none`` = ``J.sum(0)``). A zero row is never projected on.
    """

    def solve(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        num_tasks = gramian.shape[0]
        coefficients = torch.eye(num_tasks, dtype=gramian.dtype, device=gramian.device)
        if num_tasks == 1:
            return coefficients[0]
        order = self.orders_of_others(num_tasks, gramian.device)
        rows = torch.arange(num_tasks, device=gramian.device)
        squared_norms = gramian.diagonal()
        for k in range(num_tasks - 1):
            j = order[:, k]
            inner = (coefficients * gramian[j]).sum(1)  # g_i' . g_j for every i
            conflict = (inner < 0) & (squared_norms[j] > 0)
            shift = torch.where(conflict, inner / torch.where(conflict, squared_norms[j], 1), 0)
            coefficients = coefficients.index_put((rows, j), -shift, accumulate=True)
        return coefficients.sum(0)
