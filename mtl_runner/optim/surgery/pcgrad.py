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
        """The ``T - 1`` rounds depend on each other (a round reads the coefficients the
        last one wrote), so they stay a loop; everything a round reads that does not
        depend on ``C`` (the visited rows of ``M``, their norms, the positions written) is
        gathered once before it. A round is then five small ops instead of a dozen: at
        T = 40 the per-op overhead of 39 rounds, not their arithmetic, is the cost. The
        arithmetic is the same as projecting one round at a time (bit for bit): the
        shift ``(g_i' . g_j) / |g_j|^2`` of a conflict, nothing otherwise."""
        num_tasks = gramian.shape[0]
        coefficients = torch.eye(num_tasks, dtype=gramian.dtype, device=gramian.device)
        if num_tasks == 1:
            return coefficients[0]
        visits = self.orders_of_others(num_tasks, gramian.device).T  # (T-1, T): round k visits visits[k, i]
        visited_rows = gramian[visits]  # (T-1, T, T): round k's M[j_i] for every i
        norms = gramian.diagonal()[visits]
        # -|g_j|^2, or -inf for a zero row: a conflict's -shift is then min(g_i'.g_j, 0) / that
        # (IEEE division is sign-symmetric, so -(a / b) == a / -b exactly), and a zero row's
        # shift is a zero, as is that of a pair without conflict.
        negated_norms = torch.where(norms > 0, -norms, -torch.inf)
        positions = (torch.arange(num_tasks, device=gramian.device) * num_tasks + visits).contiguous()  # C_i's entry j_i
        flat = coefficients.view(-1)
        for k in range(num_tasks - 1):
            inner = (coefficients * visited_rows[k]).sum(1)  # g_i' . g_j for every i
            flat.index_put_((positions[k],), inner.clamp_max(0) / negated_norms[k], accumulate=True)
        return coefficients.sum(0)
