"""``surgery=fairgrad``: alpha-fair resource allocation (Ban & Ji, "Fair Resource
Allocation in Multi-Task Learning", ICML 2024, Algorithm 1)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mtl_runner.optim.surgery.base import GramianWeighting, Space
from mtl_runner.optim.surgery.simplex import host_resident

#: Step sizes tried at once by the line search of each Newton iteration (1, 1/2, ...).
LINE_SEARCH_STEPS = 24
#: Relative change of every ``w_t`` (float64) below which Newton has settled: near the
#: solution the steps only move round-off back and forth.
SETTLED = 1e3 * torch.finfo(torch.float64).eps


class FairGrad(GramianWeighting):
    """``w > 0`` with ``M w = w^(-1/alpha)`` (elementwise), ``d = sum_t w_t g_t``: the
    paper's optimality condition of maximising ``sum_t u(g_t . d)`` under
    ``||d|| <= 1``, ``u`` the alpha-fair utility. ``alpha = 1`` is proportional fairness
    (Nash-MTL's equation ``M w = 1 / w``), ``alpha = 2`` minimum potential delay,
    large ``alpha`` approaches max-min fairness; the paper tunes ``alpha`` per benchmark.

    How it is solved: ``M w = w^(-1/alpha)`` is the stationarity condition of the strictly
    convex potential ``F(w) = 0.5 w^T M w - sum_t h(w_t)`` with ``h' (w) = w^(-1/alpha)``
    (``h = log`` for ``alpha = 1``, else ``w^(1 - 1/alpha) / (1 - 1/alpha)``), so the solution
    is ``F``'s unique minimiser. It is found by at most ``optim_niter`` Newton steps (Hessian
    ``M + diag(w^(-1/alpha - 1) / alpha)``), each with a batched line search over step sizes
    ``1, 1/2, ..., 2^-23`` that keeps ``w > 0`` and decreases ``F`` (see :func:`_newton`),
    in float64, on
    ``G = M / ||M||_F`` (then ``w = a ||M||_F^(-alpha / (alpha + 1))``), warm-started from the
    previous step's solution (saved in :meth:`state_dict`). On the CPU the loop stops once
    ``w`` has settled to round-off (the result of running on, to float64 round-off).
    Warm-started solves settle in 3 to 5 steps; a cold start with a large ``alpha`` and
    badly scaled rows can need more than the default 20 (``alpha = 20``: up to 100).

    Scale: the paper's ``d = sum_t w_t g_t`` (docs/methods.md), not ``J.sum(0)``'s scale:
    ``w`` is set by the gradients' norms (``w_t = ||g_t||^(-2 alpha / (alpha + 1))`` for
    orthogonal rows), the same scale as torchjd's FairGrad.

    Deviations: the authors' code (and torchjd) solve the equation as a nonnegative least
    squares problem with SciPy on the host each step; here it is a damped Newton method in
    torch on the Gramian's device (the same solution where one exists). Zero and dropped
    rows get weight 0 and the others are solved without them. When 0 is a positive
    combination of the rows (Pareto stationarity) no solution exists: ``F`` is unbounded
    below along that combination and ``d`` shrinks towards 0 (stays finite).
    """

    #: No surgery.task_subset: its Newton solve starts from the last step's weights,
    #: which would belong to other tasks under a subset.
    allows_task_subset = False

    def __init__(
        self, alpha: float = 2.0, optim_niter: int = 20, space: Space = "params", task_subset: int | None = None
    ) -> None:
        if not alpha > 0:
            raise ValueError(f"surgery.alpha must be > 0, got {alpha!r}")
        if optim_niter < 1:
            raise ValueError(f"surgery.optim_niter must be a positive integer, got {optim_niter!r}")
        super().__init__(space, task_subset)
        self.alpha = alpha
        self.optim_niter = optim_niter
        self.previous: Tensor | None = None

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "previous": None if self.previous is None else self.previous.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.previous = None if state["previous"] is None else state["previous"].clone()

    def solve(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        size = gramian.shape[0]
        diagonal = gramian.diagonal()
        scale = torch.linalg.matrix_norm(gramian)
        active = diagonal > diagonal.max() * size * torch.finfo(gramian.dtype).eps
        identity = torch.eye(size, dtype=gramian.dtype, device=gramian.device)
        # Inactive tasks are decoupled (their block is the identity, solution 1), then zeroed.
        normalised = torch.where(active[:, None] & active[None, :], gramian / torch.where(scale > 0, scale, 1), identity)
        exponent = self.alpha / (self.alpha + 1)
        start = normalised.diagonal().clamp_min(torch.finfo(gramian.dtype).tiny).pow(-exponent)  # exact if orthogonal
        unscale = scale.clamp_min(torch.finfo(gramian.dtype).tiny).pow(exponent)
        if self.previous is not None and self.previous.shape == (size,):
            previous = self.previous.to(device=gramian.device, dtype=gramian.dtype) * unscale
            start = torch.where(previous > 0, previous, start)
        start = torch.where(active & torch.isfinite(start), start, 1)
        # Symmetrised: a float32 J @ J.T can differ from its transpose by round-off, and then
        # the equation's left side is no longer the potential's gradient.
        exact = normalised.double()
        solution = _newton((exact + exact.T) / 2, start.double(), self.alpha, self.optim_niter).to(gramian.dtype)
        weights = torch.where(active, solution / unscale, 0)
        self.previous = weights
        return weights


def _potential(gramian: Tensor, w: Tensor, alpha: float) -> Tensor:
    """``F(w) = 0.5 w^T G w - sum h(w)`` for each row of ``w`` (all entries > 0)."""
    utility = w.log() if alpha == 1 else w.pow(1 - 1 / alpha) / (1 - 1 / alpha)
    return 0.5 * ((w @ gramian) * w).sum(-1) - utility.sum(-1)


def _newton(gramian: Tensor, w: Tensor, alpha: float, iterations: int) -> Tensor:
    """Damped Newton on ``F`` from ``w > 0``, at most ``iterations`` steps.

    The step size is the largest of ``1, 1/2, ...`` that keeps ``w > 0`` and either
    decreases ``F`` enough (Armijo: ``F(w + s p) <= F(w) + s (grad F . p) / 10^4``), or ends
    where the slope of ``F`` along the direction is still <= 0 up to round-off (``F`` is
    convex along the line, so it has not increased). Far from the solution the first
    test decides; near it, where differences of ``F`` are lost in round-off, the second
    (slopes are gradients, accurate there), which keeps Newton's quadratic convergence.
    On the CPU the loop stops once a step changes no ``w_t`` by more than :data:`SETTLED`
    (relative): later steps would only move round-off."""
    steps = 0.5 ** torch.arange(LINE_SEARCH_STEPS, dtype=gramian.dtype, device=gramian.device)
    stop_early = host_resident(gramian)
    for _ in range(iterations):
        gradient = gramian @ w - w.pow(-1 / alpha)
        hessian = gramian + torch.diag(w.pow(-1 / alpha - 1) / alpha)
        direction = -torch.linalg.solve_ex(hessian, gradient)[0]
        candidates = w + steps[:, None] * direction
        inside = (candidates > 0).all(-1)
        positive = torch.where(inside[:, None], candidates, 1)
        pull, push = positive @ gramian, positive.pow(-1 / alpha)
        slopes = ((pull - push) * direction).sum(-1)
        round_off = SETTLED * ((pull + push) * direction.abs()).sum(-1)  # pull, push > 0
        decrease = _potential(gramian, positive, alpha) - _potential(gramian, w, alpha)
        armijo = decrease <= 1e-4 * steps * (gradient @ direction)
        acceptable = inside & (armijo | (slopes <= round_off)) & torch.isfinite(slopes) & torch.isfinite(decrease)
        first = acceptable.to(torch.int8).argmax()  # the largest acceptable step
        moved = torch.where(acceptable.any(), candidates[first], w)
        settled = stop_early and bool(((moved - w).abs() <= SETTLED * w).all())
        w = moved
        if settled:
            break
    return w
