"""``balancer=dwa``: Dynamic Weight Average (Liu, Johns & Davison, "End-to-End Multi-Task
Learning with Attention", CVPR 2019).

In epoch ``k`` (1-based) the weights are

    w_t(k) = T softmax_t(r_t(k-1) / temp),   r_t(k-1) = Lbar_t(k-1) / Lbar_t(k-2),

with ``Lbar_t`` the epoch-mean training loss of task ``t`` (delivered by the trainer
through :meth:`epoch_end`), and ``w_t = 1`` in the first two epochs, where the ratio is not
defined yet. A task whose loss fell less over the last epoch (larger ``r_t``) gets more
weight. ``temp = 2`` as in the paper; larger temperatures flatten the weights towards 1.

Scale: ``sum_t w_t = T`` (uniform = all ones), as in the paper.

Robustness: the denominator ``Lbar_t(k-2)`` is clamped at 1e-12, so a zero epoch loss
gives a large finite ratio rather than inf/NaN; non-finite ratios are mapped to 0 (NaN)
or the largest float (inf) before the (max-subtracted, stable) softmax.

State (the last two epoch means and the number of epochs seen) is in buffers; the weights
are chosen with ``torch.where`` on the device, with no host synchronisation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtl_runner.optim.balancers.base import Balancer
from mtl_runner.tasks import Task

_EPS = 1e-12


class DWA(Balancer):
    def __init__(self, temp: float = 2.0) -> None:
        super().__init__()
        if temp <= 0:
            raise ValueError(f"balancer.temp: must be > 0, got {temp}")
        self.temp = float(temp)
        self.register_buffer("last_epoch_loss", torch.zeros(0))  # Lbar(k-1)
        self.register_buffer("previous_epoch_loss", torch.zeros(0))  # Lbar(k-2)
        self.register_buffer("epochs_seen", torch.zeros((), dtype=torch.long))

    def setup(self, tasks: Sequence[Task], generator: torch.Generator | None) -> None:
        super().setup(tasks, generator)
        device, num = self.last_epoch_loss.device, len(self.tasks)
        self.last_epoch_loss = torch.ones(num, device=device)
        self.previous_epoch_loss = torch.ones(num, device=device)
        self.epochs_seen.zero_()

    def weights(self, losses: Tensor) -> Tensor:
        self._follow(losses.device)
        ratio = self.last_epoch_loss / self.previous_epoch_loss.clamp_min(_EPS)
        logits = torch.nan_to_num(ratio / self.temp, nan=0.0)
        dynamic = len(self.tasks) * torch.softmax(logits, dim=0)
        out = torch.where(self.epochs_seen >= 2, dynamic, torch.ones_like(dynamic))
        return out.to(losses.dtype)

    def epoch_end(self, mean_losses: Tensor) -> None:
        self._follow(mean_losses.device)
        self.previous_epoch_loss.copy_(self.last_epoch_loss)
        self.last_epoch_loss.copy_(mean_losses.detach().to(self.last_epoch_loss))
        self.epochs_seen.add_(1)
