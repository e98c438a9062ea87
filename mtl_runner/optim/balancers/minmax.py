"""``balancer=minmax``: worst-case task weighting, as in robust / fair multi-task learning:
minimise ``max_t L_t / L_t(0)``. (Group DRO, Sagawa et al., ICLR 2020, optimises the same
kind of worst-group objective with exponentiated-gradient weights that accumulate over
steps; this balancer is the memoryless form that docs/methods.md specifies: the weights
depend only on the current normalised losses.)

Losses are normalised by their value at the first step this balancer sees, ``n_t =
L_t / L_t(0)``, so tasks on different scales compete on relative progress. Then

* ``tau = 0`` (default, the hard min-max): all weight on the worst task,
  ``w = T onehot(argmax_t n_t)`` (ties: the first such task);
* ``tau > 0`` (smooth form): ``w = T softmax(n_t / tau)``; ``tau -> 0`` recovers the hard
  form and ``tau -> inf`` gives ``uniform``.

Scale: both forms sum to ``T``, like ``uniform`` (the project convention), so the hard form
is the ``tau -> 0`` limit of the smooth one and switching ``tau`` does not change the
effective learning rate. (The plain min-max objective ``max_t n_t`` would put weight 1, not
``T``, on the worst task; under SGD that is ours with a ``T`` times smaller learning rate.)
The weight multiplies ``L_t`` itself (not ``L_t / L_t(0)``): the normalisation only chooses
which task is worst.

Numerics: ``L_t(0)`` is clamped at 1e-12; non-finite logits are mapped to finite ones
before the stable softmax. State (``L(0)`` and whether it was recorded) is in buffers; the
first-step branch is a ``torch.where``, so there is no host synchronisation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtl_runner.optim.balancers.base import Balancer
from mtl_runner.tasks import Task

_EPS = 1e-12


class MinMax(Balancer):
    def __init__(self, tau: float = 0.0) -> None:
        super().__init__()
        if tau < 0:
            raise ValueError(f"balancer.tau: must be >= 0 (0 = hard argmax), got {tau}")
        self.tau = float(tau)
        self.register_buffer("initial_losses", torch.zeros(0))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def setup(self, tasks: Sequence[Task], generator: torch.Generator | None) -> None:
        super().setup(tasks, generator)
        self.initial_losses = torch.ones(len(self.tasks), device=self.initial_losses.device)
        self.initialized.fill_(False)

    def normalized_losses(self, losses: Tensor) -> Tensor:
        current = losses.detach().to(self.initial_losses.dtype)
        return current / self.initial_losses.clamp_min(_EPS)

    def weights(self, losses: Tensor) -> Tensor:
        self._follow(losses.device)
        current = losses.detach().to(self.initial_losses.dtype)
        self.initial_losses.copy_(torch.where(self.initialized, self.initial_losses, current))
        self.initialized.fill_(True)
        normalized = torch.nan_to_num(self.normalized_losses(losses), nan=0.0)
        num = normalized.shape[0]
        if self.tau > 0:
            logits = torch.nan_to_num(normalized / self.tau, nan=0.0)
            w = num * torch.softmax(logits, dim=0)
        else:
            worst = torch.arange(num, device=normalized.device) == normalized.argmax()
            w = num * worst.to(normalized.dtype)
        return w.to(losses.dtype)
