"""``surgery=imtl_g``: the gradient part of impartial multi-task learning (Liu et al.,
"Towards Impartial Multi-task Learning", ICLR 2021)."""

from __future__ import annotations

import torch
from torch import Tensor

from mtl_runner.optim.surgery.base import GramianWeighting
from mtl_runner.optim.surgery.simplex import ridge


class IMTLG(GramianWeighting):
    """Weights ``alpha`` with ``sum_t alpha_t = 1`` such that ``d = sum_t alpha_t g_t``
    has the same projection onto every unit gradient ``u_t = g_t / ||g_t||``.

    The paper's closed form ``alpha_{2..T} = g_1 U^T (D U^T)^-1`` is equivalent to
    ``alpha proportional to M^-1 n`` with ``n_t = ||g_t||``: then ``(M alpha)_t = g_t . d``
    is proportional to ``||g_t||``, i.e. ``d . u_t`` is the same for all ``t``. This form
    needs only the Gramian and, as in Quinton & Rey's generalisation (torchjd's IMTLG),
    stays defined for linearly dependent rows (here via a round-off ridge instead of a
    pseudo-inverse). Where the weights cannot be normalised (their sum vanishes, e.g.
    only zero rows), they are 0.

    Scale: the paper's ``alpha`` sums to 1 (a mean-like scale); here it is multiplied by
    ``T`` (docs/methods.md's convention).
    """

    def solve(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        norms = gramian.diagonal().clamp_min(0).sqrt()
        solution, info = torch.linalg.solve_ex(ridge(gramian), norms)
        solution = torch.where((info == 0) & torch.isfinite(solution), solution, torch.zeros_like(solution))
        total = solution.sum()
        usable = total.abs() > torch.finfo(gramian.dtype).eps * solution.abs().sum()
        alpha = torch.where(usable, solution / torch.where(usable, total, 1), torch.zeros_like(solution))
        return gramian.shape[0] * alpha
