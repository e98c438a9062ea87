"""``surgery=mgda``: the multiple-gradient descent algorithm as used by Sener & Koltun,
"Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018. With
``surgery.space=features`` the Gramian is that of the shared representation's gradients,
which is the paper's MGDA-UB."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from mtl_runner.optim.surgery.base import GramianWeighting, Space
from mtl_runner.optim.surgery.simplex import min_norm_weights, support_of

Normalization = Literal["none", "l2", "loss", "loss+"]


class MGDA(GramianWeighting):
    """``w* = argmin_{w in simplex} ||sum_t w_t g_t||^2``, ``d = T sum_t w*_t g_t``.

    The simplex problem is solved exactly in torch (closed form for T = 2 is a special
    case of the support enumeration in :mod:`simplex`; the paper's Frank-Wolfe would be
    approximate). ``normalization`` rescales the gradients *for the solve only*, as the
    authors' code does (``l2``: ``g_t / ||g_t||``; ``loss``: ``g_t / L_t``; ``loss+``:
    ``g_t / (L_t ||g_t||)``); the weights are then applied to the raw rows.

    Scale: the paper's direction is the convex combination (a point of the hull);
    here it is multiplied by ``T`` (docs/methods.md's convention), so the effective learning
    rate is ``T`` times that of the reference code.
    """

    def __init__(self, normalization: Normalization = "none", space: Space = "params", task_subset: int | None = None) -> None:
        if normalization not in ("none", "l2", "loss", "loss+"):
            raise ValueError(f"surgery.normalization must be none, l2, loss or loss+, got {normalization!r}")
        super().__init__(space, task_subset)
        self.normalization = normalization

    def solve(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        scale = self._scale(gramian, losses)
        convex = min_norm_weights(scale[:, None] * gramian * scale[None, :], self.hint(tuple(scale.shape)))
        self.support = support_of(convex)
        return gramian.shape[0] * convex

    def _scale(self, gramian: Tensor, losses: Tensor | None) -> Tensor:
        """Per-task factors ``s_t`` of the normalised rows ``s_t g_t`` (0 for a zero row)."""
        ones = torch.ones(gramian.shape[0], dtype=gramian.dtype, device=gramian.device)
        if self.normalization == "none":
            return ones
        divisor = ones
        if self.normalization in ("l2", "loss+"):
            divisor = divisor * gramian.diagonal().clamp_min(0).sqrt()
        if self.normalization in ("loss", "loss+"):
            if losses is None:
                raise ValueError(f"surgery.normalization={self.normalization} needs the task losses: call surgery(J, losses)")
            divisor = divisor * losses.detach().to(gramian.dtype).abs()
        return torch.where(divisor > 0, 1 / torch.where(divisor > 0, divisor, 1), 0)
