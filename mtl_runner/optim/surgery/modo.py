"""``surgery=modo``: multi-objective gradient with double sampling, MoDo (Chen, Fu, Xu,
Chen, "Three-Way Trade-Off in Multi-Objective Learning: Optimization, Generalization and
Conflict-Avoidance", NeurIPS 2023, Algorithm 1)."""

from __future__ import annotations

from torch import Tensor

from mtl_runner.optim.surgery.base import GramianWeighting, Space
from mtl_runner.optim.surgery.carried_weights import CarriedSimplexWeights
from mtl_runner.optim.surgery.simplex import project_onto_simplex


class MoDo(CarriedSimplexWeights, GramianWeighting):
    """Per training step, one projected gradient step on MGDA's weights,
    ``lambda <- Proj_simplex(lambda - gamma (G1^T G2 + rho I) lambda)``, then
    ``d = G lambda`` with the updated ``lambda``. ``lambda`` starts at ``1/T`` and is state
    (saved in :meth:`state_dict`); ``rho >= 0`` is the paper's regularisation of the
    weight subproblem. ``gamma`` is an absolute step size, as in the paper (its effect
    depends on the gradients' scale).

    Scale: the paper's ``d`` is a convex combination of the rows; here it is multiplied
    by ``T`` (docs/methods.md's convention).

    Deviations: the paper draws two independent minibatches for ``G1^T G2`` (an unbiased
    estimate of the Gramian) and, in its three-sample variant, a third for ``d``; the
    engine computes one Jacobian per step, so the Gramian here is the single minibatch's
    ``J J^T`` (biased by the gradients' noise) and ``d`` uses the same rows: the paper's
    update rule on a biased Gramian estimate, without its convergence guarantee.
    Defaults ``gamma = 0.1``, ``rho = 0.1`` are torchjd's (the paper tunes both).
    """

    def __init__(self, gamma: float = 0.1, rho: float = 0.1, space: Space = "params", task_subset: int | None = None) -> None:
        if not gamma > 0:
            raise ValueError(f"surgery.gamma must be > 0, got {gamma!r}")
        if not rho >= 0:
            raise ValueError(f"surgery.rho must be >= 0, got {rho!r}")
        super().__init__(space, task_subset)
        self.gamma = gamma
        self.rho = rho

    def solve(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        size = gramian.shape[0]
        weights = self.carried_weights(size, gramian)
        weights = project_onto_simplex(weights - self.gamma * (gramian @ weights + self.rho * weights))
        self.simplex_weights = weights
        return size * weights
