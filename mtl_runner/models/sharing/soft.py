"""``sharing=soft``: one encoder copy per task, coupled by a penalty on their distance.

Penalty (added to the loss by the gradient engine, logged as ``loss/train/soft_penalty``):

    lam * sum_{i<j} ||theta_i - theta_j||^2

over matching encoder parameters (heads stay free). It is computed as
``lam * T * sum_t ||theta_t - mean(theta)||^2``, the same number (the pairwise sum equals
``T`` times the sum of squared distances to the mean), in ``O(T P)``. The raw pairwise
distance is logged as ``soft/distance``.

Evgeniou & Pontil (KDD 2004) write the estimator as ``beta_t = beta_0 + v_t`` with
penalty ``lambda_ep * sum_t ||v_t||^2`` and ``beta_0`` free; minimising over ``beta_0``
gives ``beta_0 = mean_t beta_t``, so their penalty is ``lambda_ep * sum_t ||beta_t -
mean(beta)||^2 = (lambda_ep / T) * sum_{i<j} ||beta_i - beta_j||^2``, i.e.
``lam = lambda_ep / T``. Their objective sums squared errors, while the runner's
regression loss is a mean over the batch; with full batches of ``n`` rows per task the
runner minimises ``1/n`` times their objective when ``lam = lambda_ep / (n T)``
(``backbone=linear``, ``dataset=linear_tasks``, see ``tests/test_sharing.py``).

``lam = 0`` is separate training (``sharing=none``, identical step by step: the same
initialisation, no penalty term); ``lam -> inf`` forces the copies together, i.e. one
pooled encoder (``sharing=hard``). All copies start from the same weights (those of
``sharing=none``), so the penalty starts at 0.

Shared parameters: none (each copy is reached by one task's loss only; the penalty
couples them). Gradient surgery and gradient-based balancers are refused when the trainer
is built (one-line error naming ``surgery``/``balancer`` and ``sharing``); the conflict
diagnostics report that they do not apply.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtl_runner.models.sharing.base import BackboneFactory
from mtl_runner.models.sharing.none import Separate
from mtl_runner.tasks import Task


class SoftSharing(Separate):
    def __init__(
        self, backbone: BackboneFactory, tasks: Sequence[Task], input_shape: Sequence[int], lam: float = 0.01
    ) -> None:
        if lam < 0:
            raise ValueError(f"sharing.lam must be >= 0, got {lam}")
        super().__init__(backbone, tasks, input_shape)
        self.lam = float(lam)
        self._last_distance: Tensor | None = None

    def distance(self) -> Tensor:
        """``sum_{i<j} ||theta_i - theta_j||^2`` over matching encoder parameters."""
        groups = zip(*(list(enc.parameters()) for enc in self.encoders.values()))
        total: Tensor | None = None
        num_tasks = len(self.encoders)
        for group in groups:
            stacked = torch.stack(group)
            term = num_tasks * (stacked - stacked.mean(0)).pow(2).sum()
            total = term if total is None else total + term
        if total is None:
            return torch.zeros(())
        return total

    def penalty(self) -> Tensor | None:
        if self.lam == 0.0 or len(self.encoders) < 2:
            return None
        distance = self.distance()
        self._last_distance = distance.detach()
        return self.lam * distance

    def diagnostics(self) -> dict[str, Tensor]:
        distance = self._last_distance
        if distance is None:
            with torch.no_grad():
                distance = self.distance()
        return {"loss/train/soft_penalty": self.lam * distance, "soft/distance": distance}
