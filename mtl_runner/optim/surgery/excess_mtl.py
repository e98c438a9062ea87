"""``surgery=excess_mtl``: task weights from excess risks, ExcessMTL (He, Zhou, Zhao,
"Robust Multi-Task Learning with Excess Risks", ICML 2024, Algorithm 1)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from mtl_runner.optim.surgery.base import Space, Surgery


class ExcessMTL(Surgery):
    """Weights ``alpha`` on the simplex, raised for the tasks furthest from their optimum:
    each step, with the AdaGrad-like accumulator ``S_t += g_t * g_t`` (elementwise, a
    diagonal approximation of the task's Hessian), the excess risk of task ``t`` is
    estimated from the second-order Taylor expansion as ``e_t = sum_p g_tp^2 / sqrt(S_tp)``;
    relative to a baseline ``e0_t``, ``r_t = e_t / e0_t``, the weights take an exponentiated
    gradient step ``alpha_t <- alpha_t exp(robust_step_size r_t)``, renormalised to sum 1,
    and ``d = sum_t alpha_t g_t``.

    The baseline removes the tasks' different loss scales: with ``n_warmup_steps = 0`` it
    is the first step's ``e`` (the authors' code and LibMTL); otherwise the weights stay
    uniform for that many steps and the baseline is the mean ``e`` over them (the paper,
    Appendix C.1, collects statistics for 3 epochs first). State (``S``, ``alpha``, the
    baseline, the warm-up sum and the step) is saved in :meth:`state_dict`; ``S`` has
    ``J``'s shape (``T x P``, the method's memory price) and needs ``J`` itself
    (``space=params`` only).

    Scale: the paper's ``alpha`` sums to 1; here it is multiplied by ``T`` (docs/methods.md's
    convention), the scale of the authors' code, whose weights start at 1 each.

    Deviations: the authors' code (and torchjd) update the weights on the first step with
    the raw ``e`` (which depends on the gradients' scale) and divide by the baseline only
    from the second step; here the first step's ``r`` is 1 for every task (weights stay
    uniform), as the paper's normalised update implies. The paper's ``1/2`` in the Taylor
    term cancels in ``r``. A coordinate that has only ever seen zero gradients
    (``S_tp = 0``) contributes 0 (the authors add a constant inside the square root, which
    makes ``e`` depend on the gradients' absolute scale); a task whose baseline is 0 (its
    gradient was zero) has ``r = 0``. The weights are updated in log space (a softmax of
    ``log alpha + step r``), the same update without overflow. Rows with a non-finite
    entry are dropped (zero rows this step, weight 0).
    """

    def __init__(
        self, robust_step_size: float = 1.0, n_warmup_steps: int = 0, space: Space = "params", task_subset: int | None = None
    ) -> None:
        if not robust_step_size > 0:
            raise ValueError(f"surgery.robust_step_size must be > 0, got {robust_step_size!r}")
        if n_warmup_steps < 0:
            raise ValueError(f"surgery.n_warmup_steps must be >= 0, got {n_warmup_steps!r}")
        super().__init__(space, task_subset)
        self.robust_step_size = robust_step_size
        self.n_warmup_steps = n_warmup_steps
        self.statistics: dict[str, Any] = {}

    def setup(self, num_tasks: int, generator: torch.Generator | None) -> None:
        super().setup(num_tasks, generator)
        self.statistics = {
            "step": 0,
            "log_weights": torch.full((num_tasks,), -math.log(num_tasks)),
            "squares": None,
            "baseline": None,
            "warmup_sum": torch.zeros(num_tasks),
        }

    def state_dict(self) -> dict[str, Any]:
        return {key: value.clone() if isinstance(value, Tensor) else value for key, value in self.statistics.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.statistics = {key: value.clone() if isinstance(value, Tensor) else value for key, value in state.items()}

    def __call__(self, jacobian: Tensor, losses: Tensor | None = None) -> Tensor:
        size = jacobian.shape[0]
        if not self.statistics or self.statistics["log_weights"].shape != (size,):
            raise ValueError(f"surgery=excess_mtl was not set up for {size} tasks: call setup(num_tasks, generator) first")
        finite = torch.isfinite(jacobian).all(1)
        jacobian = torch.where(finite[:, None], jacobian, torch.zeros_like(jacobian))
        squared = jacobian * jacobian
        squares = self.statistics["squares"]
        # Accumulated in place: the T x P statistic is the method's one large buffer. Where
        # it is 0 so is this step's square (0 / 0): such coordinates count 0.
        squares = squared.clone() if squares is None else squares.to(squared).add_(squared)
        excess = (squared / squares.sqrt()).nan_to_num_(nan=0.0).sum(1)
        step = self.statistics["step"] + 1
        log_weights = self.statistics["log_weights"].to(excess)
        if step <= self.n_warmup_steps:
            self.statistics["warmup_sum"] = self.statistics["warmup_sum"].to(excess) + excess
            if step == self.n_warmup_steps:
                self.statistics["baseline"] = self.statistics["warmup_sum"] / self.n_warmup_steps
        else:
            baseline = excess if self.statistics["baseline"] is None else self.statistics["baseline"].to(excess)
            self.statistics["baseline"] = baseline
            ratio = torch.where(baseline > 0, excess / torch.where(baseline > 0, baseline, 1), 0)
            log_weights = torch.log_softmax(log_weights + self.robust_step_size * ratio, 0)
        self.statistics.update(step=step, squares=squares, log_weights=log_weights)
        self.last_weights = size * log_weights.exp() * finite
        return self.last_weights @ jacobian
