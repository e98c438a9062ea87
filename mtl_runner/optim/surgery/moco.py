"""``surgery=moco``: multi-objective gradient with correction, MoCo (Fernando, Shen, Liu,
Chaudhury, Murugesan, Chen, "Mitigating Gradient Bias in Multi-objective Learning: A
Provably Convergent Approach", ICLR 2023, Algorithm 1)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from mtl_runner.optim.surgery.base import Space, Surgery
from mtl_runner.optim.surgery.carried_weights import CarriedSimplexWeights
from mtl_runner.optim.surgery.simplex import project_onto_simplex

GradientNorm = Literal["raw", "loss"]


class MoCo(CarriedSimplexWeights, Surgery):
    """Per training step ``k = 1, 2, ...``: the tracked gradients follow the observed ones,
    ``Y <- Y - beta_k (Y - J)``; MGDA's weights take one projected gradient step on the
    tracked Gramian, ``lambda <- Proj_simplex(lambda - gamma_k (Y Y^T + rho I) lambda)``;
    ``d = lambda @ Y``. Step sizes decay as ``beta_k = beta / k^beta_sigma`` and
    ``gamma_k = gamma / k^gamma_sigma``; ``beta = 0.5``, ``gamma = 0.1``, both sigmas 0.5 and
    ``rho = 0`` are LibMTL's defaults for MoCo. Tracking averages the gradients' noise
    out of ``Y``, which is how MoCo removes the bias of MGDA-type weights computed from
    one stochastic Jacobian.

    ``Y`` has ``J``'s shape (``T x P``, the method's memory price) and is not in the span of
    the current rows, so MoCo is not a re-weighting of them: it needs ``J`` itself
    (``space=params`` only). State (``Y``, ``lambda``, ``k``) is saved in
    :meth:`state_dict`; ``lambda`` starts at ``1/T`` and ``Y`` at the first ``J`` (the paper
    leaves ``Y_0`` free; starting from 0 would shrink the first updates by ``beta_k``).

    Scale: the paper's ``d`` is a convex combination of the tracked rows; here it is
    multiplied by ``T`` (docs/methods.md's convention). ``last_weights`` are ``T lambda``,
    the weights of the tracked rows.

    ``gradient_norm``: ``raw`` tracks the gradients as they are (the paper's algorithm);
    ``loss`` first rescales every row to the norm of its task's loss,
    ``g_t <- L_t g_t / ||g_t||``, as LibMTL's MoCo (written from the authors' code) does
    before tracking (a zero row stays zero). It needs the losses: ``surgery(J, losses)``.

    Deviations: the paper projects each tracked gradient onto a ball of radius ``L_i``
    (a bound its analysis needs); that projection is left out, as in LibMTL. LibMTL also
    replaces the projection of ``lambda`` onto the simplex by a softmax; here it is the
    paper's projection. Rows with a non-finite entry (or a
    non-finite loss, with ``gradient_norm=loss``) are dropped (zero rows this step).
    """

    def __init__(
        self,
        beta: float = 0.5,
        beta_sigma: float = 0.5,
        gamma: float = 0.1,
        gamma_sigma: float = 0.5,
        rho: float = 0.0,
        gradient_norm: GradientNorm = "raw",
        space: Space = "params",
        task_subset: int | None = None,
    ) -> None:
        if not 0 < beta <= 1:
            raise ValueError(f"surgery.beta must be in (0, 1], got {beta!r}")
        if not gamma > 0:
            raise ValueError(f"surgery.gamma must be > 0, got {gamma!r}")
        for key, value in (("beta_sigma", beta_sigma), ("gamma_sigma", gamma_sigma), ("rho", rho)):
            if not value >= 0:
                raise ValueError(f"surgery.{key} must be >= 0, got {value!r}")
        if gradient_norm not in ("raw", "loss"):
            raise ValueError(f"surgery.gradient_norm must be raw or loss, got {gradient_norm!r}")
        super().__init__(space, task_subset)
        self.beta = beta
        self.beta_sigma = beta_sigma
        self.gamma = gamma
        self.gamma_sigma = gamma_sigma
        self.rho = rho
        self.gradient_norm = gradient_norm
        self.step = 0
        self.tracked: Tensor | None = None

    def setup(self, num_tasks: int, generator: torch.Generator | None) -> None:
        super().setup(num_tasks, generator)
        self.step = 0
        self.tracked = None

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "step": self.step, "tracked": None if self.tracked is None else self.tracked.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.step = int(state["step"])
        self.tracked = None if state["tracked"] is None else state["tracked"].clone()

    def __call__(self, jacobian: Tensor, losses: Tensor | None = None) -> Tensor:
        size = jacobian.shape[0]
        weights = self.carried_weights(size, jacobian)
        if self.gradient_norm == "loss":
            jacobian = self._to_loss_norm(jacobian, losses)
        finite = torch.isfinite(jacobian).all(1, keepdim=True)
        jacobian = torch.where(finite, jacobian, torch.zeros_like(jacobian))
        self.step += 1
        if self.tracked is None or self.tracked.shape != jacobian.shape:
            tracked = jacobian.clone()
        else:
            tracked = self.tracked.to(device=jacobian.device, dtype=jacobian.dtype)
            tracked = tracked - self.beta / self.step**self.beta_sigma * (tracked - jacobian)
        gamma = self.gamma / self.step**self.gamma_sigma
        weights = project_onto_simplex(weights - gamma * (tracked @ (tracked.T @ weights) + self.rho * weights))
        self.tracked, self.simplex_weights = tracked, weights
        self.last_weights = size * weights
        return self.last_weights @ tracked

    def _to_loss_norm(self, jacobian: Tensor, losses: Tensor | None) -> Tensor:
        """Rows rescaled to ``||g_t|| = L_t`` (a zero row stays zero; a non-finite loss
        makes a non-zero row non-finite, so that it is dropped)."""
        if losses is None:
            raise ValueError("surgery.gradient_norm=loss needs the task losses: call surgery(J, losses)")
        norms = jacobian.norm(dim=1, keepdim=True)
        scale = losses.detach().to(jacobian.dtype)[:, None] / torch.where(norms > 0, norms, 1)
        return jacobian * torch.where(norms > 0, scale, 0)
