"""``surgery=sdmgrad``: stochastic direction-oriented multi-objective gradient (Xiao, Ban,
Ji, "Direction-oriented Multi-objective Learning: Simple and Provable Stochastic
Algorithms", NeurIPS 2023, Algorithm 1)."""

from __future__ import annotations

import torch
from torch import Tensor

from mtl_runner.optim.surgery.base import GramianWeighting, Space
from mtl_runner.optim.surgery.carried_weights import CarriedSimplexWeights
from mtl_runner.optim.surgery.simplex import project_onto_simplex


class SDMGrad(CarriedSimplexWeights, GramianWeighting):
    """The regularised MGDA subproblem ``min_{w in simplex} 0.5 ||G w + lamda g0||^2``
    (``g0 = mean_t g_t``, the target direction; ``G w = sum_t w_t g_t``), and
    ``d = (G w + lamda g0) / (1 + lamda)``: ``lamda = 0`` is MGDA's min-norm point, a large
    ``lamda`` pulls ``d`` to the mean gradient.

    ``w`` is not solved exactly: as in the paper, it follows ``niter`` steps of projected
    stochastic gradient descent per training step, warm-started from the last step's
    ``w`` (state, saved in :meth:`state_dict`; it starts at ``1/T``). As in the authors'
    code, those steps use momentum ``momentum`` (restarted every training step) and step
    size ``lr`` on the Gramian divided by the square of the mean row norm (the paper's
    section 6.1), so ``lr`` does not depend on the gradients' scale: with ``A`` that
    normalised Gramian and ``b = 1/T``, each step follows the gradient ``A w + lamda A b``. Defaults (``lamda = 0.3``, ``lr = 10``, ``momentum = 0.5``, ``niter = 20``)
    are the authors' experimental settings, as in torchjd and LibMTL.

    Scale: the paper's ``d`` is a convex combination of the rows (``w`` and ``b`` on the
    simplex); here it is multiplied by ``T`` (docs/methods.md's convention).

    Deviations: the paper estimates ``A`` without bias from two independent minibatches
    (``G(xi)^T G(xi')``) and takes ``d`` from a third one; the engine computes one
    Jacobian per step, so ``A`` here is the single minibatch's Gramian (biased by the
    gradient noise, which MGDA-type weights then over-count) and ``d`` uses the same rows.
    torchjd's SDMGradWeighting gives the same weights when handed that Gramian.
    """

    def __init__(
        self,
        lamda: float = 0.3,
        lr: float = 10.0,
        momentum: float = 0.5,
        niter: int = 20,
        space: Space = "params",
        task_subset: int | None = None,
    ) -> None:
        if not lamda >= 0:
            raise ValueError(f"surgery.lamda must be >= 0, got {lamda!r}")
        if not lr > 0:
            raise ValueError(f"surgery.lr must be > 0, got {lr!r}")
        if not 0 <= momentum < 1:
            raise ValueError(f"surgery.momentum must be in [0, 1), got {momentum!r}")
        if niter < 1:
            raise ValueError(f"surgery.niter must be a positive integer, got {niter!r}")
        super().__init__(space, task_subset)
        self.lamda = lamda
        self.lr = lr
        self.momentum = momentum
        self.niter = niter

    def solve(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        size = gramian.shape[0]
        mean_norm = gramian.diagonal().clamp_min(0).sqrt().mean()
        scaled = gramian / torch.where(mean_norm > 0, mean_norm, 1) ** 2
        target = torch.full((size,), 1 / size, dtype=gramian.dtype, device=gramian.device)
        pull = self.lamda * (scaled @ target)  # the gradient of the cross term
        w = self.carried_weights(size, gramian)
        velocity = torch.zeros_like(w)
        for _ in range(self.niter):
            velocity = self.momentum * velocity + scaled @ w + pull
            w = project_onto_simplex(w - self.lr * velocity)
        self.simplex_weights = w
        return size * (w + self.lamda * target) / (1 + self.lamda)

