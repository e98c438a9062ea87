"""``dataset=controlled``: two linear regression tasks whose gradient conflict is set by hand.

The controlled conflict experiment of ``docs/methods.md``: inputs ``x ~ N(0, I_d)``, task ``t``
has ``k`` linear targets ``y_t = W_t x + noise``. ``W_1`` is Gaussian; ``W_perp`` is
Gaussian with its rows orthogonalised against the row space of ``W_1`` and rescaled to
``W_1``'s Frobenius norm; ``W_2 = alpha W_1 + beta W_perp`` with ``alpha^2 + beta^2 = 1``.
Because ``<W_1, W_perp>_F = 0`` and both have the same norm, the cosine between the
flattened maps is exactly ``alpha`` and ``||W_2|| = ||W_1||``: the two tasks differ in
how aligned they are and in nothing else (no loss-scale confound).

Sweeping ``alpha`` from 0 (orthogonal tasks) to 1 (identical tasks) moves the per-batch
cosine distribution of a shared trunk's task gradients from heavy conflict to a spike at
+1; negative ``alpha`` gives anti-aligned tasks.

Choices worth knowing:

- The entries of ``W_1`` and ``W_perp`` are drawn ``N(0, 1/d)`` (Gaussian, scaled), so each
  target has unit variance whatever ``d`` is and ``noise`` (a standard deviation) means
  the same signal-to-noise ratio for every ``d``. The scale does not change any cosine.
- Random streams are separate: the maps come from stream 0 and the train/val/test inputs
  and noise from streams 1-3 (seed ``4 * seed + stream``). ``W_1``, ``W_perp``, the inputs
  and the noise do not depend on ``alpha``, so two runs that differ only in ``alpha`` see
  the same inputs and the same first task; only ``W_2`` moves. Changing ``num_train``
  does not change the validation or test data.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mtl_runner.data.base import TaskSet, TensorSplit
from mtl_runner.tasks import Task

TASK_NAMES = ("t1", "t2")


def _stream(seed: int, stream: int) -> torch.Generator:
    """A CPU generator for one of a seed's independent streams (0: maps, 1-3: splits)."""
    return torch.Generator().manual_seed(4 * seed + stream)


def _check(alpha: float, d: int, k: int) -> None:
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and -1.0 <= alpha <= 1.0):
        raise ValueError(f"dataset.alpha must be in [-1, 1] (the cosine between W_1 and W_2), got {alpha}")
    if k < 1 or d < 1:
        raise ValueError(f"dataset.k and dataset.d must be >= 1, got k={k}, d={d}")
    if 2 * k > d:
        raise ValueError(
            f"dataset.k={k} is too large for dataset.d={d}: W_perp needs k rows orthogonal to W_1's k rows, so 2*k <= d"
        )


def controlled_maps(alpha: float = 0.5, d: int = 64, k: int = 8, seed: int = 0) -> tuple[Tensor, Tensor]:
    """The target maps ``(W_1, W_2)``, each ``(k, d)`` float64, for the given ``alpha``.

    Exposed so that tests and scripts can check the construction (cosine ``alpha``, equal
    norms) and compare a trained model's heads against the truth.
    """
    _check(alpha, d, k)
    gen = _stream(seed, 0)
    scale = 1.0 / math.sqrt(d)
    w1 = torch.randn(k, d, generator=gen, dtype=torch.float64) * scale
    raw = torch.randn(k, d, generator=gen, dtype=torch.float64) * scale
    # Orthonormal basis of W_1's row space (columns of q), then remove that component from
    # every row of raw; twice, because one Gram-Schmidt pass loses orthogonality to rounding.
    q, _ = torch.linalg.qr(w1.T)
    w_perp = raw
    for _ in range(2):
        w_perp = w_perp - (w_perp @ q) @ q.T
    w_perp = w_perp * (w1.norm() / w_perp.norm())
    beta = math.sqrt(max(0.0, 1.0 - alpha * alpha))
    w2 = alpha * w1 + beta * w_perp
    return w1, w2


def controlled(
    alpha: float = 0.5,
    d: int = 64,
    k: int = 8,
    noise: float = 0.01,
    num_train: int = 4096,
    num_val: int = 512,
    num_test: int = 512,
    seed: int = 0,
) -> TaskSet:
    """Two regression tasks ``t1``, ``t2`` (``k`` outputs each) on shared inputs ``x`` in R^d.

    ``noise`` is the standard deviation of the Gaussian noise added to every target
    (targets have unit variance, see the module docstring). Deterministic from ``seed``.
    """
    _check(alpha, d, k)
    if not (math.isfinite(noise) and noise >= 0):
        raise ValueError(f"dataset.noise must be a finite standard deviation >= 0, got {noise}")
    for key, value in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test)):
        if value < 1:
            raise ValueError(f"dataset.{key} must be >= 1, got {value}")
    w1, w2 = controlled_maps(alpha, d, k, seed)
    splits = [_split(n, w1, w2, noise, _stream(seed, stream)) for stream, n in enumerate((num_train, num_val, num_test), 1)]
    tasks = tuple(Task(name, "regression", k) for name in TASK_NAMES)
    return TaskSet("controlled", tasks, *splits, input_shape=(d,))


def _split(n: int, w1: Tensor, w2: Tensor, noise: float, gen: torch.Generator) -> TensorSplit:
    k, d = w1.shape
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    # Noise is drawn before it is scaled, so the noise stream is the same for every `noise`.
    eps = torch.randn(2, n, k, generator=gen, dtype=torch.float64) * noise
    targets = {name: (x @ w.T + e).float() for name, w, e in zip(TASK_NAMES, (w1, w2), eps)}
    return TensorSplit(x.float(), targets)
