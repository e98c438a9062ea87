"""Closed-form linear multi-task regression (Evgeniou & Pontil, KDD 2004).

Model: task ``t`` has coefficients ``beta_t = beta_0 + v_t``; the estimator minimises

    sum_t ||y_t - X_t beta_t||^2 + lambda sum_t ||v_t||^2        (beta_0 unpenalised).

It is ridge regression on a block design. Stack the parameters ``w = (beta_0, v_1, ...,
v_T)`` (length ``p + T p``); task ``t``'s rows of the design ``Z`` hold ``X_t`` in the
shared columns and ``X_t`` again in column block ``t`` (zeros elsewhere), so
``Z w = X_t (beta_0 + v_t)`` on those rows. The penalty is ``diag(0_p, lambda I_Tp)``.

Limits: ``lambda -> 0`` leaves the deviations free, i.e. independent OLS per task;
``lambda -> inf`` forces ``v_t = 0``, one pooled OLS fit. In between, for orthonormal
designs (``X_t^T X_t = n I``), ``beta_t = (1 - a) beta_t^ols + a mean_s(beta_s^ols)`` with
``a = lambda / (n + lambda)``: shrinkage of each task towards the mean of the tasks. For
Gaussian deviations ``v_t ~ N(0, tau^2 I)`` and noise variance ``sigma^2`` the best
shrinkage of that form is at ``lambda = sigma^2 / tau^2``.

Numerics: the penalised normal equations are singular at ``lambda = 0`` (the shared block
is the sum of the task blocks) and have condition ``~ 1 / lambda`` near it. Instead of
forming them we solve the equivalent augmented least-squares problem
``min ||[Z; sqrt(Lambda)] w - [y; 0]||`` with an SVD-based solver (LAPACK ``gelsd``),
whose conditioning is the square root of the normal equations' and which returns the
minimum-norm ``w`` at ``lambda = 0`` exactly; ``beta_t`` is unique there whenever each
``X_t`` has full column rank. Everything runs in float64 on the CPU (the systems are
``(sum_t n_t + T p) x (p + T p)``, tiny).

Inputs: ``xs`` is a ``(T, n, p)`` tensor or a sequence of ``(n_t, p)`` tensors (tasks may
have different sample counts), ``ys`` a ``(T, n)`` tensor or a sequence of ``(n_t,)``
tensors. Every fit returns a ``(T, p)`` float64 tensor of per-task coefficients.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Union

import torch
from torch import Tensor

Xs = Union[Tensor, Sequence[Tensor]]
Ys = Union[Tensor, Sequence[Tensor]]


def _as_tasks(xs: Xs, ys: Ys) -> tuple[list[Tensor], list[Tensor]]:
    x_list = [torch.as_tensor(x).detach().to("cpu", torch.float64) for x in xs]
    y_list = [torch.as_tensor(y).detach().to("cpu", torch.float64).reshape(-1) for y in ys]
    if len(x_list) != len(y_list) or not x_list:
        raise ValueError(f"need the same, positive number of design matrices and targets, got {len(x_list)} and {len(y_list)}")
    p = x_list[0].shape[-1]
    for t, (x, y) in enumerate(zip(x_list, y_list)):
        if x.ndim != 2 or x.shape[1] != p or x.shape[0] != y.shape[0]:
            raise ValueError(f"task {t}: X must be (n_t, {p}) and y (n_t,), got {tuple(x.shape)} and {tuple(y.shape)}")
    return x_list, y_list


def _lstsq(a: Tensor, b: Tensor) -> Tensor:
    """Least squares by SVD (rank-deficient systems give the minimum-norm solution)."""
    return torch.linalg.lstsq(a, b.unsqueeze(-1), driver="gelsd").solution.squeeze(-1)


def block_design(xs: Sequence[Tensor]) -> Tensor:
    """The design ``Z``, ``(sum_t n_t, p + T p)``: shared columns repeat ``X_t``, column
    block ``t`` holds ``X_t`` on task ``t``'s rows."""
    num_tasks, p = len(xs), xs[0].shape[1]
    blocks = []
    for t, x in enumerate(xs):
        row = torch.zeros(x.shape[0], p + num_tasks * p, dtype=x.dtype)
        row[:, :p] = x
        row[:, p * (t + 1) : p * (t + 2)] = x
        blocks.append(row)
    return torch.cat(blocks)


def fit_independent(xs: Xs, ys: Ys) -> Tensor:
    """One OLS fit per task, ``(T, p)``."""
    x_list, y_list = _as_tasks(xs, ys)
    return torch.stack([_lstsq(x, y) for x, y in zip(x_list, y_list)])


def fit_pooled(xs: Xs, ys: Ys) -> Tensor:
    """One OLS fit on all tasks' samples, repeated for every task, ``(T, p)``."""
    x_list, y_list = _as_tasks(xs, ys)
    beta = _lstsq(torch.cat(x_list), torch.cat(y_list))
    return beta.expand(len(x_list), -1).clone()


def fit_mtl(xs: Xs, ys: Ys, lam: float) -> Tensor:
    """The Evgeniou & Pontil estimator for penalty ``lam >= 0``, ``(T, p)``.

    ``lam = inf`` is the pooled fit (the limit)."""
    if not (lam >= 0):  # also rejects NaN
        raise ValueError(f"lambda must be >= 0, got {lam}")
    if math.isinf(lam):
        return fit_pooled(xs, ys)
    x_list, y_list = _as_tasks(xs, ys)
    num_tasks, p = len(x_list), x_list[0].shape[1]
    z = block_design(x_list)
    penalty = torch.zeros(num_tasks * p, p + num_tasks * p, dtype=torch.float64)
    penalty[:, p:] = math.sqrt(lam) * torch.eye(num_tasks * p, dtype=torch.float64)
    a = torch.cat([z, penalty])
    b = torch.cat([torch.cat(y_list), torch.zeros(num_tasks * p, dtype=torch.float64)])
    w = _lstsq(a, b)
    return w[:p] + w[p:].view(num_tasks, p)


def per_task_mse(betas: Tensor, xs: Xs, ys: Ys) -> Tensor:
    """Mean squared error of each task's coefficients on that task's samples, ``(T,)``."""
    x_list, y_list = _as_tasks(xs, ys)
    betas = torch.as_tensor(betas).to("cpu", torch.float64)
    if betas.shape != (len(x_list), x_list[0].shape[1]):
        raise ValueError(f"betas must be (T, p) = ({len(x_list)}, {x_list[0].shape[1]}), got {tuple(betas.shape)}")
    return torch.stack([(x @ b - y).pow(2).mean() for x, b, y in zip(x_list, betas, y_list)])


def test_mse(betas: Tensor, xs: Xs, ys: Ys) -> float:
    """Average over tasks of each task's test MSE (every task counts the same; with equal
    sample counts this is also the MSE over all samples)."""
    return float(per_task_mse(betas, xs, ys).mean())


test_mse.__test__ = False  # type: ignore[attr-defined]  # not a pytest test when imported into one
