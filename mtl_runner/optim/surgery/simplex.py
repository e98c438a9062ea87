"""Small T-dimensional problems on the Gramian, solved in torch on its device.

Row-weighting methods (mgda, cagrad, upgrad) each solve a tiny constrained problem in the
``T x T`` Gramian ``M = J J^T`` per step. Calling a host QP solver would force a
device-to-host copy (a synchronisation) every step, so the problems are solved here with
fixed-shape tensor code:

- up to :data:`MAX_EXACT_TASKS` tasks, *exactly*, by enumerating every candidate support
  (active set) at once: the KKT system of each support is a small linear system, all
  ``2^T - 1`` of them go through one batched ``solve_ex``, every candidate is made
  feasible, and the feasible candidate with the lowest objective wins. A wrong or
  ill-conditioned candidate can only lose, because each one is scored by the true
  objective at a feasible point, while the optimum's own support yields the optimum;
- beyond that (``2^T`` grows too fast), by accelerated projected gradient with a fixed
  number of iterations (no data-dependent stopping, so no host synchronisation).

Singular Gramians (identical or zero rows) are handled by a ridge of one unit of
round-off of each diagonal entry, which keeps every system solvable and changes the
result at the dtype's precision.

On the CPU, where reading a value back waits for no device (:func:`host_resident`), each
solver starts from the support of the previous step's solution instead (``hint``:
consecutive Gramians of a training run are close, so it is usually optimal or nearly):
block principal pivoting (Judice & Pires 1994) in float64, i.e. solve on the support,
move every entry that violates the KKT conditions to the other side, repeat, at most
:data:`PIVOTS` times. A convex problem's KKT point is its optimum, so the result is the
enumeration's answer (more accurate, being float64); a row that does not settle falls
back to the enumeration. On a GPU the enumeration runs every step (a handful of batched
kernels), so nothing waits on the device. :func:`_solve` is that dispatch, written once
for the three problems.

Why this module is long: each of the three problems (min norm in the hull, dual-cone
projection, CAGrad's dual) needs its enumeration, its pivoting step and its fallback, and
they share the support machinery, the tolerances and the driver; split per problem, each
file would import nearly all of the rest.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache, partial

import torch
from torch import Tensor

#: Largest T solved exactly by support enumeration (4095 small systems per step).
MAX_EXACT_TASKS = 12
#: Iterations of the projected-gradient fallback for T > MAX_EXACT_TASKS.
FALLBACK_ITERATIONS = 500
#: Pivoting steps from a hinted support before the enumeration takes over.
PIVOTS = 6
#: Pivoting steps from a cold start beyond MAX_EXACT_TASKS (no enumeration to fall back
#: on; each step is one batched float64 solve, far cheaper than the fallback's iterations).
LARGE_PIVOTS = 24


def ridge(gramian: Tensor) -> Tensor:
    """``M + diag(delta)``, ``delta_t`` one unit of round-off of ``M_tt`` (so the ridge is
    invariant to rescaling a task's gradient), plus floors for zero rows and an all-zero
    Gramian, so that every principal sub-system is solvable."""
    eps = torch.finfo(gramian.dtype).eps
    diagonal = gramian.diagonal(dim1=-2, dim2=-1)
    delta = eps * diagonal + eps**2 * diagonal.mean(-1, keepdim=True) + torch.finfo(gramian.dtype).tiny ** 0.5
    return gramian + torch.diag_embed(delta)


def host_resident(tensor: Tensor) -> bool:
    """Whether ``tensor`` is in host memory, where a data-dependent branch (reading a
    flag back) waits for nothing; on a GPU it would synchronise the device."""
    return tensor.device.type == "cpu"


def support_of(solution: Tensor, lower: Tensor | float = 0.0) -> Tensor:
    """Where a solution is strictly above its bound: the support (free set) to hint to
    the next solve."""
    return solution > lower


def _round_off(dtype: torch.dtype) -> float:
    """The allowance for accumulated round-off in these small solves, relative to the
    magnitudes involved: a thousand units of the dtype's precision."""
    return 1e3 * torch.finfo(dtype).eps


def _bound_tolerance(lower: Tensor) -> Tensor:
    """How far below its bound ``v >= lower`` a solution may sit and still count as feasible."""
    return _round_off(lower.dtype) * (1 + lower.abs())


def _kkt_tolerance(solution: Tensor, gramian: Tensor) -> Tensor:
    """Round-off allowance of the entries of ``solution @ gramian`` (per entry, from the
    magnitudes that were summed)."""
    return _round_off(gramian.dtype) * (solution.abs() @ gramian.abs())


def _pivot(step: Callable[[Tensor], tuple[Tensor, Tensor, Tensor]], free: Tensor, pivots: int) -> tuple[Tensor, Tensor]:
    """Block principal pivoting from the hinted supports ``free`` (rows ``(R, T)``).
    ``step(free)`` gives each row's solution on its support, which entries violate the
    KKT conditions (in the support but past its bound, or out of it with a negative
    multiplier), and whether the row's system was solvable. Violating entries switch
    sides until no row has one, at most ``pivots`` times (or until a row cannot
    move: unsolvable with nothing to switch). Returns the last solutions and which rows
    are optimal."""
    for _ in range(pivots):
        solution, violated, solved = step(free)
        optimal = solved & ~violated.any(-1)
        stuck = ~optimal & ~violated.any(-1)
        if bool(optimal.all()) or bool(stuck.any()):
            break
        free = free ^ violated
    return solution, optimal


def _solve(
    gramian: Tensor,
    hint: Tensor | None,
    step: Callable[..., tuple[Tensor, Tensor, Tensor]],
    data: tuple[Tensor, ...],
    enumerated: Callable[[Tensor | None], Tensor],
    approximate: Callable[[], Tensor],
    cold: Tensor,
) -> Tensor:
    """The one solver dispatch of every problem here, for rows of solutions ``(R, T)``
    (see the module docstring): on the CPU with a ``hint`` (free sets ``(R, T)``), block
    principal pivoting in float64, ``step(gramian, *data, free)`` being the problem's
    :func:`_pivot` step, and the rows that do not settle go to ``enumerated(rows)`` (a
    boolean row mask); otherwise ``enumerated(None)``, every row by support enumeration.
    Beyond :data:`MAX_EXACT_TASKS`, where enumeration is out of reach: on the CPU the
    pivoting too (from the free sets ``cold`` when there is no hint yet, with up to
    :data:`LARGE_PIVOTS` steps), so that a pivot that settles gives the exact optimum,
    and ``approximate()`` for the rows that do not settle; on a GPU ``approximate()``."""
    large = gramian.shape[0] > MAX_EXACT_TASKS
    if not host_resident(gramian) or (hint is None and not large):
        return approximate() if large else enumerated(None)
    pivots = PIVOTS if hint is not None else LARGE_PIVOTS
    start = hint if hint is not None else cold
    solution, optimal = _pivot(partial(step, gramian.double(), *(tensor.double() for tensor in data)), start, pivots)
    solution = solution.to(gramian.dtype)
    if bool(optimal.all()):
        return solution
    fallback = approximate()[~optimal] if large else enumerated(~optimal)
    return solution.index_put((~optimal,), fallback)


@lru_cache(maxsize=64)
def supports(num_tasks: int, device: torch.device, with_empty: bool = False) -> Tensor:
    """Every non-empty subset of the tasks (and the empty one first, if asked) as a
    boolean mask, shape ``(2^T - 1, T)`` (or ``(2^T, T)``); cached, it is static."""
    codes = torch.arange(0 if with_empty else 1, 2**num_tasks)
    return ((codes[:, None] >> torch.arange(num_tasks)) & 1 == 1).to(device)


@lru_cache(maxsize=64)
def _system_masks(mask: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """For :func:`solve_on_support`: where a system takes ``M`` (both indices in ``S``),
    and the identity entries off ``S``; cached per (static) support mask."""
    inside = (mask[:, :, None] & mask[:, None, :]).to(dtype)
    outside = torch.diag_embed((~mask).to(dtype))
    return inside, outside


def solve_on_support(gramian: Tensor, mask: Tensor, rhs: Tensor, *, static: bool = True) -> tuple[Tensor, Tensor]:
    """For each support ``S`` (rows of ``mask``, ``(K, T)``): ``x`` with
    ``M_SS x_S = rhs_S`` and ``x = rhs`` off ``S`` (those rows of the system are the
    identity), for ``rhs`` of shape ``(K, T, R)``; and whether the solve succeeded
    (``(K,)``). ``static``: ``mask`` is a cached one from :func:`supports` (its system
    masks are cached too); a hint changes every step and is not cached."""
    masks = _system_masks if static else _system_masks.__wrapped__
    inside, outside = masks(mask, gramian.dtype)
    systems = torch.addcmul(outside, inside, ridge(gramian))
    solution, info = torch.linalg.solve_ex(systems, rhs)
    return solution, info == 0


def project_onto_simplex(v: Tensor) -> Tensor:
    """Euclidean projection of each row of ``v`` onto the probability simplex (sort-based)."""
    size = v.shape[-1]
    sorted_v, _ = torch.sort(v, dim=-1, descending=True)
    cumsum = sorted_v.cumsum(-1) - 1
    index = torch.arange(1, size + 1, dtype=v.dtype, device=v.device)
    active = sorted_v - cumsum / index > 0
    rho = active.to(v.dtype).cumsum(-1).argmax(-1, keepdim=True)  # last True position
    theta = cumsum.gather(-1, rho) / (rho + 1).to(v.dtype)
    return (v - theta).clamp_min(0)


def _lipschitz(gramian: Tensor) -> Tensor:
    """An upper bound of ``lambda_max(M)`` (Frobenius norm), floored away from zero."""
    return torch.linalg.matrix_norm(gramian).clamp_min(torch.finfo(gramian.dtype).tiny ** 0.5)


def _best(candidates: Tensor, objective: Tensor, valid: Tensor) -> Tensor:
    """The valid candidate (row) with the lowest finite objective."""
    usable = valid & torch.isfinite(objective)
    return candidates[torch.where(usable, objective, torch.inf).argmin()]


# ------------------------------------------------------------------ min norm in the hull
def min_norm_weights(gramian: Tensor, hint: Tensor | None = None) -> Tensor:
    """``argmin_{w in simplex} w^T M w``: the convex weights of the minimum-norm point of
    the convex hull of the rows (MGDA's subproblem). ``hint``: a support ``(T,)`` to try
    first (see the module docstring)."""
    return _solve(
        gramian,
        None if hint is None else hint[None],
        _min_norm_on,
        (),
        lambda rows: _min_norm_enumerated(gramian)[None],
        lambda: _min_norm_projected_gradient(gramian)[None],
        torch.ones((1, gramian.shape[0]), dtype=torch.bool, device=gramian.device),  # every task in the support
    )[0]


def _min_norm_enumerated(gramian: Tensor) -> Tensor:
    """Every support's candidate ``w`` proportional to ``M_SS^-1 1``, the feasible one with
    the lowest norm."""
    mask = supports(gramian.shape[0], gramian.device)
    ones = mask.to(gramian.dtype)[..., None]
    z, solved = solve_on_support(gramian, mask, ones)  # w_S proportional to (M_SS)^-1 1
    candidates, feasible = _onto_simplex_face(z[..., 0], mask)
    objective = ((candidates @ gramian) * candidates).sum(-1)
    return _best(candidates, objective, solved & feasible)


def _min_norm_on(gramian: Tensor, support: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_pivot`'s step for the min-norm problem: ``w`` proportional to
    ``M_SS^-1 1`` on the support; KKT: ``w >= 0`` and ``(M w)_j >= w^T M w`` off it."""
    z, solved = solve_on_support(gramian, support, support[..., None].to(gramian.dtype), static=False)
    total = z[..., 0].sum(-1, keepdim=True)
    w = z[..., 0] / total
    gradient = w @ gramian
    slack = gradient - (gradient * w).sum(-1, keepdim=True) + _kkt_tolerance(w, gramian)
    violated = torch.where(support, w < -_round_off(gramian.dtype), slack < 0)
    return w.clamp_min(0), violated, solved & (total[:, 0] > 0) & support.any(-1)


def _onto_simplex_face(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Candidate weights normalised to sum 1 (round-off negatives clipped), and whether
    each is feasible: no clearly negative entry, positive mass, finite."""
    total = x.sum(-1, keepdim=True)
    w = x / total
    tolerance = _round_off(x.dtype)
    feasible = (w >= -tolerance).all(-1) & (total[:, 0] > 0) & torch.isfinite(w).all(-1)
    w = w.clamp_min(0) * mask
    return w / w.sum(-1, keepdim=True), feasible


def _min_norm_projected_gradient(gramian: Tensor) -> Tensor:
    step = 1 / (2 * _lipschitz(gramian))
    w = torch.full((gramian.shape[0],), 1 / gramian.shape[0], dtype=gramian.dtype, device=gramian.device)
    y, previous = w, w
    for k in range(FALLBACK_ITERATIONS):
        w = project_onto_simplex(y - step * 2 * (gramian @ y))
        y = w + (k / (k + 3)) * (w - previous)
        previous = w
    return w


# ------------------------------------------------------------------- dual-cone projection
def dual_cone_weights(gramian: Tensor, lower: Tensor, hint: Tensor | None = None) -> Tensor:
    """For each row ``u`` of ``lower`` (``(R, T)``), ``argmin_{v >= u} v^T M v``.

    With ``M = J J^T`` and ``g = J^T u``, ``J^T v`` is the Euclidean projection of ``g``
    onto the dual cone ``{x : J x >= 0}`` (Quinton & Rey 2024, Proposition 1), so the
    projection is found from the Gramian alone. ``hint``: free sets ``(R, T)`` to try
    first (see the module docstring); rows whose hint fails are enumerated."""
    return _solve(
        gramian,
        hint,
        _dual_cone_on,
        (lower,),
        lambda rows: _dual_cone_enumerated(gramian, lower if rows is None else lower[rows]),
        lambda: _dual_cone_projected_gradient(gramian, lower),
        torch.zeros(lower.shape, dtype=torch.bool, device=gramian.device),  # no conflict: v = u
    )


def _dual_cone_on(gramian: Tensor, lower: Tensor, free: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_pivot`'s step for the dual cone: each row's solution on its free set
    (``v = u`` off it); KKT: ``v >= u`` on the free set and the bounds' multipliers
    ``(M v)_j`` non-negative off it."""
    pinned = lower * ~free
    rhs = torch.where(free, -(pinned @ gramian), pinned)
    solution, solved = solve_on_support(gramian, free, rhs[..., None], static=False)
    v = solution[..., 0]
    below = v < lower - _bound_tolerance(lower)
    violated = torch.where(free, below, v @ gramian + _kkt_tolerance(v, gramian) < 0)
    return torch.maximum(v, lower), violated, solved


def _dual_cone_enumerated(gramian: Tensor, lower: Tensor) -> Tensor:
    """Every free set's solution for every row, the feasible one with the lowest objective."""
    num_tasks = gramian.shape[0]
    free = supports(num_tasks, gramian.device, with_empty=True)  # empty: every bound active
    # On the free set F: M_FF v_F = -M_FA u_A; elsewhere v = u (identity rows).
    pinned = lower * ~free[:, None, :]  # (K, R, T)
    rhs = torch.where(free[:, None, :], pinned @ -gramian, pinned).transpose(1, 2)  # M symmetric
    candidates, solved = solve_on_support(gramian, free, rhs)
    candidates = candidates.transpose(1, 2)  # (K, R, T)
    feasible = (candidates >= lower - _bound_tolerance(lower)).all(-1) & solved[:, None]
    objective = ((candidates @ gramian) * candidates).sum(-1)  # (K, R)
    best = torch.where(feasible & torch.isfinite(objective), objective, torch.inf).argmin(0)  # (R,)
    chosen = candidates[best, torch.arange(lower.shape[0], device=gramian.device)]
    return torch.maximum(chosen, lower)


def _dual_cone_projected_gradient(gramian: Tensor, lower: Tensor) -> Tensor:
    step = 1 / (2 * _lipschitz(gramian))
    v = lower.clone()
    y, previous = v, v
    for k in range(FALLBACK_ITERATIONS):
        v = torch.maximum(y - step * 2 * (y @ gramian), lower)
        y = v + (k / (k + 3)) * (v - previous)
        previous = v
    return v


# ---------------------------------------------------------------------------- CAGrad
def cagrad_weights(gramian: Tensor, radius: Tensor, hint: Tensor | None = None) -> Tensor:
    """``argmin_{w in simplex} w^T M b + r sqrt(w^T M w)``, ``b = 1/T`` (CAGrad's dual,
    Liu et al. 2021, eq. 4 with ``r = c ||g0||``).

    Exact path: on a support ``S`` the stationarity conditions
    ``(M b)_S + r M_SS w_S / n = nu 1`` with ``n = ||g_w||`` and ``sum w = 1`` give, with
    ``z = M_SS^-1 1`` and ``y = M_SS^-1 (M b)_S``, ``w_S = (nu z - y) / sqrt(disc)`` where
    ``nu`` solves ``s_z nu^2 - 2 s_y nu + y.(M b)_S - r^2 = 0`` (``s_* = sum``). The
    min-norm candidates of the same supports are added, which covers ``g_w = 0``.
    ``hint``: a support ``(T,)`` to try first (its stationary point, where ``g_w != 0``;
    see the module docstring)."""
    num_tasks = gramian.shape[0]
    mean = torch.full((num_tasks,), 1 / num_tasks, dtype=gramian.dtype, device=gramian.device)
    toward_mean = gramian @ mean
    return _solve(
        gramian,
        None if hint is None else hint[None],
        _cagrad_on,
        (toward_mean, radius),
        lambda rows: _cagrad_enumerated(gramian, toward_mean, radius)[None],
        lambda: _cagrad_projected_gradient(gramian, toward_mean, radius)[None],
        torch.ones((1, num_tasks), dtype=torch.bool, device=gramian.device),
    )[0]


def _cagrad_enumerated(gramian: Tensor, toward_mean: Tensor, radius: Tensor) -> Tensor:
    """Every support's stationary and min-norm candidates, the valid one with the lowest
    objective."""
    mask = supports(gramian.shape[0], gramian.device)
    stationary, feasible, min_norm, min_norm_feasible = _cagrad_candidates(gramian, toward_mean, radius, mask)
    candidates = torch.cat([stationary, min_norm])
    valid = torch.cat([feasible, min_norm_feasible])
    norms = ((candidates @ gramian) * candidates).sum(-1).clamp_min(0).sqrt()
    objective = candidates @ toward_mean + radius * norms
    return _best(candidates, objective, valid)


def _cagrad_on(gramian: Tensor, toward_mean: Tensor, radius: Tensor, support: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_pivot`'s step for CAGrad: the support's stationary point (``g_w != 0``);
    KKT: ``w >= 0``, and the gradient ``M b + r M w / ||g_w||`` off the support no
    smaller than on it (where it is equal)."""
    rhs = torch.stack([torch.ones_like(toward_mean), toward_mean], -1) * support[..., None]
    solution, solved = solve_on_support(gramian, support, rhs, static=False)
    w, valid = _cagrad_stationary(solution, toward_mean, radius)
    gw = w @ gramian
    squared = (gw * w).sum(-1, keepdim=True)
    norm = squared.clamp_min(0).sqrt()
    round_off, floor = _round_off(gramian.dtype), torch.finfo(gramian.dtype).tiny
    # g_w = 0 to round-off (w sums to 1, so against the largest squared row norm) is
    # the min-norm regime, where the objective has no gradient: the enumeration's case.
    away_from_zero = squared[:, 0] > round_off * gramian.diagonal().max()
    gradient = toward_mean + radius * gw / norm.clamp_min(floor)
    allowance = _kkt_tolerance(w, gramian) * (1 + radius / norm.clamp_min(floor))
    slack = gradient - (gradient * w).sum(-1, keepdim=True) + allowance
    violated = torch.where(support, w < -round_off, slack < 0)
    return w.clamp_min(0), violated, solved & valid & away_from_zero & support.any(-1)


def _cagrad_stationary(solution: Tensor, toward_mean: Tensor, radius: Tensor) -> tuple[Tensor, Tensor]:
    """Each support's stationary point from ``[z, y] = M_SS^-1 [1, M b]`` (zero off the
    support), before clipping to the simplex, and whether its quadratic has a root."""
    z, y = solution[..., 0], solution[..., 1]
    s_z, s_y = z.sum(-1), y.sum(-1)
    q = (y * toward_mean).sum(-1)
    disc = s_y**2 - s_z * (q - radius**2)
    root = disc.clamp_min(0).sqrt()
    nu = (s_y + root) / s_z
    return (nu[:, None] * z - y) / root[:, None], disc > 0


def _cagrad_candidates(
    gramian: Tensor, toward_mean: Tensor, radius: Tensor, mask: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per support (rows of ``mask``): the stationary point and whether it is valid
    (solvable, real, on the simplex), and the min-norm point and whether it is."""
    rhs = torch.stack([torch.ones_like(toward_mean), toward_mean], -1) * mask[..., None]
    solution, solved = solve_on_support(gramian, mask, rhs)
    raw, real = _cagrad_stationary(solution, toward_mean, radius)
    stationary, feasible = _onto_simplex_face(raw, mask)
    min_norm, min_norm_feasible = _onto_simplex_face(solution[..., 0], mask)
    return stationary, feasible & real & solved, min_norm, min_norm_feasible & solved


def _cagrad_projected_gradient(gramian: Tensor, toward_mean: Tensor, radius: Tensor) -> Tensor:
    floor = torch.finfo(gramian.dtype).tiny ** 0.5
    mean_norm = toward_mean.mean().clamp_min(0).sqrt().clamp_min(floor)  # ||g0||, as b.M b = mean(M b)
    step = 1 / (2 * _lipschitz(gramian) * (1 + radius / mean_norm))  # 1 + c: the norm term's weight
    w = torch.full_like(toward_mean, 1 / toward_mean.shape[0])
    for _ in range(FALLBACK_ITERATIONS):
        norm = (w @ gramian @ w).clamp_min(0).sqrt().clamp_min(floor)
        w = project_onto_simplex(w - step * (toward_mean + radius * (gramian @ w) / norm))
    return w
