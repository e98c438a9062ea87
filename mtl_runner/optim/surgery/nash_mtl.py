"""``surgery=nash_mtl``: the Nash bargaining solution (Navon, Shamsian, Achituve, Maron,
Kawaguchi, Chechik, Fetaya, "Multi-Task Learning as a Bargaining Game", ICML 2022,
Algorithm 1)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mtl_runner.optim.surgery.base import GramianWeighting, Space
from mtl_runner.optim.surgery.simplex import host_resident

#: Step sizes tried at once by the line search of each Newton iteration (1, 1/2, ...).
LINE_SEARCH_STEPS = 24


class NashMTL(GramianWeighting):
    """``alpha > 0`` with ``M alpha = 1 / alpha`` (``alpha_i g_i . d = 1`` for every task,
    ``d = sum_t alpha_t g_t``), the paper's bargaining solution.

    How it is solved: ``M alpha = 1 / alpha`` is exactly the stationarity condition of the
    strictly convex potential ``F(a) = 0.5 a^T G a - sum_i log a_i`` (``a > 0``), so the
    solution is ``F``'s unique minimiser. It is found by ``optim_niter`` Newton steps on
    ``F`` (Hessian ``G + diag(1 / a^2)``, positive definite), each with a batched line
    search over ``1, 1/2, ..., 2^-23`` that keeps ``a > 0`` and never increases ``F``,
    warm-started from the previous solution, on ``G = M / ||M||_F`` (``alpha = a /
    sqrt(||M||_F)``). Fixed-shape torch code on the Gramian's device: no host solver and
    no synchronisation (on the CPU the loop stops once ``a`` no longer moves). This
    replaces the paper's sequence of convex approximations (CCP, each step a conic
    program solved by cvxpy/ECOS on the host): the same
    solution, reached by another route; ``optim_niter`` counts Newton steps instead
    of CCP steps (default 10, not the authors' 20: Newton converges quadratically and
    reached round-off within 8 steps from a cold start on random, badly scaled and
    nearly parallel Gramians up to T = 10; each step costs kernel launches).

    Options as in the authors' code: ``update_weights_every`` reuses ``alpha`` for ``k``
    steps; ``max_norm > 0`` scales ``alpha`` so that ``||d|| <= max_norm`` (0 disables).
    State (the last ``alpha`` and the step counter) is saved in :meth:`state_dict`.

    Scale: the paper's ``d = sum_t alpha_t g_t`` (docs/methods.md), not ``J.sum(0)``'s
    scale: ``alpha`` scales as ``1 / ||g||``, so ``d`` is invariant to rescaling any
    task's gradient (the paper's scale invariance) and its norm is ``sqrt(T)`` for
    orthogonal rows, before the ``max_norm`` clip (the authors' default 1.0).

    Degenerate input: rows that are zero (or non-finite, dropped as in every method)
    get weight 0 and the rest are solved without them. When 0 is a positive
    combination of the rows (Pareto stationarity, e.g. opposite gradients) no solution
    exists: ``F`` decreases without bound along that combination, ``alpha`` grows by at
    most ``2^optim_niter`` and ``d`` tends to 0 (as MGDA's would); it stays finite.
    """

    #: No surgery.task_subset: it warm-starts from, and may reuse, the last step's per-task weights.
    allows_task_subset = False

    def __init__(
        self,
        update_weights_every: int = 1,
        max_norm: float = 1.0,
        optim_niter: int = 10,
        space: Space = "params",
        task_subset: int | None = None,
    ) -> None:
        if update_weights_every < 1:
            raise ValueError(f"surgery.update_weights_every must be a positive integer, got {update_weights_every!r}")
        if max_norm < 0:
            raise ValueError(f"surgery.max_norm must be >= 0 (0 disables clipping), got {max_norm!r}")
        if optim_niter < 1:
            raise ValueError(f"surgery.optim_niter must be a positive integer, got {optim_niter!r}")
        super().__init__(space, task_subset)
        self.update_weights_every = update_weights_every
        self.max_norm = max_norm
        self.optim_niter = optim_niter
        self.step = 0
        self.alpha: Tensor | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "alpha": None if self.alpha is None else self.alpha.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.alpha = None if state["alpha"] is None else state["alpha"].clone()

    def solve(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        reuse = self.alpha is not None and self.alpha.shape[0] == gramian.shape[0] and self.step % self.update_weights_every != 0
        if reuse:
            assert self.alpha is not None
            alpha = self.alpha.to(device=gramian.device, dtype=gramian.dtype)
        else:
            alpha = self._solve_alpha(gramian)
            self.alpha = alpha
        self.step += 1
        if self.max_norm > 0:
            norm = (alpha @ gramian @ alpha).clamp_min(0).sqrt()
            alpha = alpha * torch.where(norm > self.max_norm, self.max_norm / norm.clamp_min(self.max_norm), 1)
        return alpha

    def _solve_alpha(self, gramian: Tensor) -> Tensor:
        """``alpha`` with ``alpha_i (M alpha)_i = 1`` on the tasks with a non-zero row, 0 on
        the others (``M`` already free of non-finite entries)."""
        diagonal = gramian.diagonal()
        scale = torch.linalg.matrix_norm(gramian)
        active = diagonal > diagonal.max() * gramian.shape[0] * torch.finfo(gramian.dtype).eps
        both = active[:, None] & active[None, :]
        identity = torch.eye(gramian.shape[0], dtype=gramian.dtype, device=gramian.device)
        # Inactive tasks are decoupled (their block is the identity, solution 1), then zeroed.
        normalised = torch.where(both, gramian / torch.where(scale > 0, scale, 1), identity)
        start = diagonal.clamp_min(torch.finfo(gramian.dtype).tiny).rsqrt() * scale.sqrt()  # exact for orthogonal rows
        if self.alpha is not None and self.alpha.shape[0] == gramian.shape[0]:
            previous = self.alpha.to(device=gramian.device, dtype=gramian.dtype) * scale.sqrt()
            start = torch.where(previous > 0, previous, start)
        start = torch.where(active & torch.isfinite(start), start, 1)
        # In float64: the line search compares values of F, whose decrease near the solution
        # is the residual squared, below float32's resolution long before convergence.
        solution = _newton(normalised.double(), start.double(), self.optim_niter).to(gramian.dtype)
        return torch.where(active, solution / scale.clamp_min(torch.finfo(gramian.dtype).tiny).sqrt(), 0)


def _potential(gramian: Tensor, a: Tensor) -> Tensor:
    """``F(a) = 0.5 a^T G a - sum log a`` for each row of ``a`` (``+inf`` where ``a <= 0``)."""
    value = 0.5 * ((a @ gramian) * a).sum(-1) - torch.where(a > 0, a, 1).log().sum(-1)
    return torch.where((a > 0).all(-1), value, torch.full_like(value, float("inf")))


def _newton(gramian: Tensor, a: Tensor, iterations: int) -> Tensor:
    """Newton's method on :func:`_potential` from ``a > 0``, at most ``iterations`` steps.

    Once no step size decreases ``F`` ("no move" wins), every later iteration would
    repeat the same computation on the same ``a``; on the CPU, where reading that back
    costs nothing, the loop stops there, with the same result as running on."""
    steps = 0.5 ** torch.arange(LINE_SEARCH_STEPS, dtype=gramian.dtype, device=gramian.device)
    stop_early = host_resident(gramian)
    for _ in range(iterations):
        gradient = gramian @ a - 1 / a
        hessian = gramian + torch.diag(a.pow(-2))
        direction = -torch.linalg.solve_ex(hessian, gradient)[0]
        candidates = torch.cat([a[None], a + steps[:, None] * direction])  # "no move" always competes
        values = _potential(gramian, candidates)
        values = torch.where(torch.isfinite(values), values, torch.full_like(values, float("inf")))
        best = values.argmin()
        if stop_early and int(best) == 0:
            break
        a = candidates[best]
    return a
