"""``surgery=upgrad``: unconflicting projection of gradients (Quinton & Rey, "Jacobian
Descent for Multi-Objective Optimization", 2024)."""

from __future__ import annotations

import torch
from torch import Tensor

from mtl_runner.optim.surgery.base import GramianWeighting
from mtl_runner.optim.surgery.simplex import dual_cone_weights, support_of


class UPGrad(GramianWeighting):
    """Each row ``g_i`` is projected onto the dual cone of the rows,
    ``{x : g_t . x >= 0 for all t}``, and the projections are summed; so ``d . g_t >= 0``
    for every task (no task's loss increases to first order), and with no conflict
    ``d = sum_t g_t``.

    The projection of ``g_i = J^T e_i`` is ``J^T v_i`` with
    ``v_i = argmin_{v >= e_i} v^T M v`` (the paper's Proposition 1), a box-constrained
    QP in the Gramian, solved in torch (exactly up to 12 tasks, see :mod:`simplex`)
    rather than with the paper's host-side quadprog; the weights are ``sum_i v_i``.

    Scale: the paper averages the projections (``1/T sum_i``, as torchjd's UPGrad does);
    here they are summed (docs/methods.md's convention, ``T`` times the paper's direction).
    """

    def solve(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        identity = torch.eye(gramian.shape[0], dtype=gramian.dtype, device=gramian.device)
        projections = dual_cone_weights(gramian, identity, self.hint(tuple(identity.shape)))
        self.support = support_of(projections, identity)
        return projections.sum(0)
