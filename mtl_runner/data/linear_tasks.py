"""``dataset=linear_tasks``: related linear regressions (Evgeniou & Pontil, KDD 2004).

Task ``t`` has coefficients ``beta_t = beta_0 + v_t`` with ``v_t ~ N(0, task_sd^2 I_p)``,
its own inputs ``X_t ~ N(0, I_p)`` (one row per sample) and targets
``y_t = X_t beta_t + e``, ``e ~ N(0, noise_sd^2)``. With few samples per task
(``n_train = 25`` for ``p = 5``) each task alone is noisy and all tasks pooled are biased;
borrowing strength between the tasks beats both (see ``mtl_runner.linear`` and
``scripts/linear_mtl.py``, where the best penalty is near ``noise_sd^2 / task_sd^2``).

The default ``beta_0 = (1.5, -2, 0, 1, -0.5)`` is the one of ``docs/methods.md``; for another
``p`` it is drawn ``N(0, I_p)`` from the seed, since no fixed vector fits every ``p``.

This is a multi-input dataset (``TaskSet.multi_input``): the splits are
:class:`~mtl_runner.data.multi_input.MultiInputSplit` and yield one mini-batch per task per
step. Every task has the same number of samples in each split.

Random streams: the coefficients come from stream 0, the train/val/test samples from
streams 1-3 (seed ``4 * seed + stream``), so changing ``n_train`` does not change the
evaluation data or the true coefficients. :func:`linear_tasks_data` gives the same data
as float64 tensors for the closed-form estimators, with the true coefficients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from mtl_runner.data.base import TaskSet
from mtl_runner.data.multi_input import MultiInputSplit
from mtl_runner.tasks import Task

BETA0_P5 = (1.5, -2.0, 0.0, 1.0, -0.5)


@dataclass(frozen=True)
class LinearTasksData:
    """Everything of one draw, float64: per split ``X`` (T, n, p) and ``y`` (T, n)."""

    beta0: Tensor  # (p,)
    betas: Tensor  # (T, p): beta_0 + v_t
    train: tuple[Tensor, Tensor]
    val: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]

    @property
    def task_names(self) -> tuple[str, ...]:
        return task_names(len(self.betas))


def task_names(num_tasks: int) -> tuple[str, ...]:
    return tuple(f"task{t}" for t in range(num_tasks))


def _stream(seed: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(4 * seed + stream)


def true_betas(num_tasks: int = 6, p: int = 5, task_sd: float = 0.4, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``(beta_0 (p,), betas (T, p))`` of a draw, float64: the truth the estimators chase.

    Deviations are drawn first, so task ``t``'s deviation does not change with
    ``num_tasks`` (the first rows of a larger draw are those of a smaller one)."""
    gen = _stream(seed, 0)
    deviations = torch.randn(num_tasks, p, generator=gen, dtype=torch.float64) * task_sd
    if p == len(BETA0_P5):
        beta0 = torch.tensor(BETA0_P5, dtype=torch.float64)
    else:
        beta0 = torch.randn(p, generator=gen, dtype=torch.float64)
    return beta0, beta0 + deviations


def _check(**values: float) -> None:
    for key in ("num_tasks", "p", "n_train", "n_val", "n_test"):
        if values[key] < 1:
            raise ValueError(f"dataset.{key} must be >= 1, got {values[key]}")
    for key in ("task_sd", "noise_sd"):
        if not (math.isfinite(values[key]) and values[key] >= 0):
            raise ValueError(f"dataset.{key} must be a finite standard deviation >= 0, got {values[key]}")


def linear_tasks_data(
    num_tasks: int = 6,
    p: int = 5,
    n_train: int = 25,
    n_val: int = 100,
    n_test: int = 500,
    task_sd: float = 0.4,
    noise_sd: float = 1.0,
    seed: int = 0,
) -> LinearTasksData:
    """The draw behind :func:`linear_tasks`, as float64 tensors with the true coefficients."""
    _check(num_tasks=num_tasks, p=p, n_train=n_train, n_val=n_val, n_test=n_test, task_sd=task_sd, noise_sd=noise_sd)
    beta0, betas = true_betas(num_tasks, p, task_sd, seed)

    def draw(n: int, stream: int) -> tuple[Tensor, Tensor]:
        gen = _stream(seed, stream)
        x = torch.randn(num_tasks, n, p, generator=gen, dtype=torch.float64)
        noise = torch.randn(num_tasks, n, generator=gen, dtype=torch.float64) * noise_sd
        return x, torch.einsum("tnp,tp->tn", x, betas) + noise

    return LinearTasksData(beta0, betas, draw(n_train, 1), draw(n_val, 2), draw(n_test, 3))


def linear_tasks(
    num_tasks: int = 6,
    p: int = 5,
    n_train: int = 25,
    n_val: int = 100,
    n_test: int = 500,
    task_sd: float = 0.4,
    noise_sd: float = 1.0,
    seed: int = 0,
) -> TaskSet:
    """``num_tasks`` regression tasks ``task0, task1, ...`` (one output each), each with its
    own inputs in R^p; float32 tensors, targets shaped (n, 1)."""
    data = linear_tasks_data(num_tasks, p, n_train, n_val, n_test, task_sd, noise_sd, seed)
    names = data.task_names

    def split(xy: tuple[Tensor, Tensor]) -> MultiInputSplit:
        x, y = xy
        return MultiInputSplit({name: (x[t].float(), y[t].float().unsqueeze(-1)) for t, name in enumerate(names)})

    tasks = tuple(Task(name, "regression", 1) for name in names)
    return TaskSet(
        "linear_tasks", tasks, split(data.train), split(data.val), split(data.test), input_shape=(p,), multi_input=True
    )
