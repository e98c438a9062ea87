"""``balancer=uncertainty``: homoscedastic-uncertainty weighting (Kendall, Gal & Cipolla,
"Multi-Task Learning Using Uncertainty to Weigh Losses", CVPR 2018).

Each task has a learnable ``s_t = log sigma_t^2`` (initialised to 0, i.e. sigma = 1). The
objective is, per task,

* regression (``task.is_regression``): ``0.5 exp(-s_t) L_t + 0.5 s_t`` (Gaussian likelihood),
* classification: ``exp(-s_t) L_t + 0.5 s_t`` (scaled-softmax likelihood),

so :meth:`weights` returns the factors ``0.5 exp(-s_t)`` / ``exp(-s_t)`` (with the graph to
``s``) and :meth:`regularizer` returns ``0.5 sum_t s_t``. The engine trains the model with the
detached weights and trains ``s`` with ``(w * losses.detach()).sum() + regularizer()``. For a
fixed loss ``L`` the optimum is ``sigma^2 = L`` (regression) and ``sigma^2 = 2 L``
(classification); the ``0.5 s`` term is what keeps sigma from running to infinity.

Scale: at initialisation regression tasks weigh 0.5 and classification tasks 1, as in the
paper (``uniform`` would give 1 everywhere). The paper writes the regulariser as
``log sigma_t = 0.5 s_t``, which is what we use; LibMTL's ``UW`` treats every task as
regression. ``lr`` (optional) is the learning rate of the trainer's param group for ``s``
(weight decay 0); without it the model's learning rate is used. ``extra_scalars`` logs
``sigma/<task>``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mtl_runner.optim.balancers.base import Balancer
from mtl_runner.tasks import Task


class Uncertainty(Balancer):
    def __init__(self, lr: float | None = None) -> None:
        super().__init__()
        if lr is not None and lr <= 0:
            raise ValueError(f"balancer.lr: must be > 0, got {lr}")
        # The trainer's param group for ``s`` uses this lr when it is not None.
        self.lr: float | None = None if lr is None else float(lr)
        self.log_var = nn.Parameter(torch.zeros(0))
        self.register_buffer("factor", torch.ones(0))

    def setup(self, tasks: Sequence[Task], generator: torch.Generator | None) -> None:
        super().setup(tasks, generator)
        device = self.log_var.device
        self.log_var = nn.Parameter(torch.zeros(len(self.tasks), device=device))
        self.factor = torch.tensor([0.5 if t.is_regression else 1.0 for t in self.tasks], device=device)

    def weights(self, losses: Tensor) -> Tensor:
        self._follow(losses.device)
        return (self.factor * torch.exp(-self.log_var)).to(losses.dtype)

    def regularizer(self) -> Tensor:
        return 0.5 * self.log_var.sum()

    def extra_scalars(self) -> dict[str, Tensor]:
        sigma = torch.exp(0.5 * self.log_var.detach())
        return {f"sigma/{name}": sigma[i] for i, name in enumerate(self.task_names)}
