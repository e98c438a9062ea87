"""``balancer=imtl_l``: the loss part of impartial multi-task learning, IMTL-L (Liu, Li,
Kuang, Xue, Chen, Yang, Liao & Zhang, "Towards Impartial Multi-task Learning", ICLR 2021).

Each task has a learnable scale ``s_t`` (initialised to 0) and is trained on

    e^{s_t} L_t - s_t,

so :meth:`weights` returns ``e^{s_t}`` (with the graph to ``s``) and :meth:`regularizer`
returns ``-sum_t s_t``. The engine trains the model with the detached weights and ``s``
with ``(w * losses.detach()).sum() + regularizer()``, i.e. ``s`` is learned by the run's
optimizer, as in the paper. The balancer's objective has gradient ``e^{s_t} L_t - 1`` in
``s_t``, so at its optimum every scaled loss ``e^{s_t} L_t`` equals 1: multiplying a
task's loss by ``c`` moves ``s_t`` by ``-log c`` and leaves that task's effective
gradient ``e^{s_t} grad L_t = grad L_t / L_t`` unchanged. This is the scale invariance
the paper asks of the loss balance; the ``-s_t`` term is what keeps ``s_t`` from running
to ``-inf`` (which would make every loss vanish).

The paper's hybrid, IMTL, applies IMTL-G to the gradients of these scaled losses: that is
``experiment=imtl`` (this balancer with ``surgery=imtl_g``; the engine hands the surgery
the rows ``e^{s_t} grad L_t``).

Scale: ``s = 0`` gives ``w = 1``, i.e. ``uniform`` (the project convention, ``uniform`` =
``sum_t L_t``), and the scaled losses keep that scale: at the optimum every task
contributes 1 to the objective. ``lr`` (optional) is the learning rate of the trainer's
param group for ``s`` (weight decay 0); without it the model's learning rate is used, as
in the paper, where ``s`` and the network share one optimizer. ``extra_scalars`` logs
``imtl_scale/<task>`` (``e^{s_t}``).

Deviations: none in the objective. Corner cases the paper does not address: ``s`` gets
no weight decay (decay would pull every scale towards 1 and break the invariance); the
weights never depend on the loss values, so a non-finite loss leaves them finite (the
trainer skips such a step, so ``s`` is not updated by it either).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mtl_runner.errors import ConfigError
from mtl_runner.optim.balancers.base import Balancer
from mtl_runner.tasks import Task


class IMTLL(Balancer):
    def __init__(self, lr: float | None = None) -> None:
        super().__init__()
        if lr is not None and lr <= 0:
            raise ConfigError(f"balancer.lr: must be > 0 (or null for the model's lr), got {lr}")
        # The trainer's param group for ``s`` uses this lr when it is not None.
        self.lr: float | None = None if lr is None else float(lr)
        self.log_scale = nn.Parameter(torch.zeros(0))

    def setup(self, tasks: Sequence[Task], generator: torch.Generator | None) -> None:
        super().setup(tasks, generator)
        self.log_scale = nn.Parameter(torch.zeros(len(self.tasks), device=self.log_scale.device))

    def weights(self, losses: Tensor) -> Tensor:
        self._follow(losses.device)
        return torch.exp(self.log_scale).to(losses.dtype)

    def regularizer(self) -> Tensor:
        return -self.log_scale.sum()

    def extra_scalars(self) -> dict[str, Tensor]:
        scale = torch.exp(self.log_scale.detach())
        return {f"imtl_scale/{name}": scale[i] for i, name in enumerate(self.task_names)}
