"""``surgery=dualproj``: the summed gradient projected onto the dual cone of the task
gradients (the projection of Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual
Learning", NeurIPS 2017, eq. 11, applied to multi-task gradients as torchjd's DualProj)."""

from __future__ import annotations

import torch
from torch import Tensor

from mtl_runner.optim.surgery.base import GramianWeighting
from mtl_runner.optim.surgery.simplex import dual_cone_weights, support_of


class DualProj(GramianWeighting):
    """``d`` is the point of the dual cone ``{x : g_t . x >= 0 for all t}`` closest to
    ``sum_t g_t``: no task's loss increases to first order, and without conflict
    ``d = sum_t g_t``.

    The projection of ``J^T 1`` is ``J^T v`` with ``v = argmin_{v >= 1} v^T M v``
    (Quinton & Rey 2024, Proposition 1), a box-constrained QP in the Gramian solved by
    :func:`~mtl_runner.optim.surgery.simplex.dual_cone_weights` (the same solver as
    upgrad, which projects every row instead of their sum); the weights are ``v``.

    Scale: torchjd's DualProj projects the mean (``1/T`` of this; the projection onto a
    cone is positively homogeneous, so the two differ by exactly ``T``); here the sum is
    projected (docs/methods.md's convention). Deviations: none beyond the solver (exact in
    torch up to 12 tasks, see :mod:`simplex`, instead of a host QP solver).
    """

    def solve(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        ones = torch.ones(1, gramian.shape[0], dtype=gramian.dtype, device=gramian.device)
        projection = dual_cone_weights(gramian, ones, self.hint(tuple(ones.shape)))
        self.support = support_of(projection, ones)
        return projection[0]
