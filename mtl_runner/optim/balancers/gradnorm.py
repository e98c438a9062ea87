"""``balancer=gradnorm``: GradNorm (Chen, Badrinarayanan, Lee & Rabinovich, "GradNorm:
Gradient Normalization for Adaptive Loss Balancing in Deep Multitask Networks", ICML 2018).

Learnable weights ``w_t`` (initialised to 1). Each step, on the last shared layer ``W``
(``requires_grads = "last_shared"``; the engine passes the *unweighted* rows
``g_t = grad_W L_t``):

* ``G_t = ||grad_W (w_t L_t)|| = w_t ||g_t||``, ``G_bar = mean_t G_t``;
* inverse training rate ``r_t = (L_t / L_t(0)) / mean_j (L_j / L_j(0))``, with ``L_t(0)``
  chosen by ``initial_loss``: ``first_step`` (the paper) the losses of the first step this
  balancer sees; ``first_epoch`` (as LibMTL) each task's mean training loss over the first
  epoch, and the weights stay at 1 until that epoch ends;
* ``L_grad = sum_t |G_t - const(G_bar r_t^alpha)|`` (the target is a constant, as in the
  paper), whose gradient in ``w_t`` is ``sign(G_t - target_t) ||g_t||``;
* one Adam step on ``w`` with that gradient only (its own optimizer, ``lr``), then
  renormalise so that ``sum_t w_t = T``.

A task that trains slowly (``r_t > 1``) gets a larger target norm and gains weight.
:meth:`scale_rows` returns the rows scaled by the weights *used this step* (those
:meth:`weights` returned, before the update), so the model update and the logged
``weight/<task>`` agree; the updated weights apply from the next step.

Scale: ``sum_t w_t = T`` (uniform = all ones), as in the paper. Defaults: ``alpha = 1.5``
(the paper's NYUv2 value), Adam with ``lr = 0.025``. The paper does not state the
optimizer of ``w``; Adam at 0.025 is the value used by common public implementations.

Why ``first_epoch`` exists: the first step's losses come from an untrained network, and a
task whose loss falls steeply in the first few steps (a regression target far from the
initial outputs: depth on the built-in data starts near 129 and is near 8 after one epoch)
then looks as if it had learned much faster than it did; GradNorm takes its weight away
long before it has. ``first_epoch`` is the default: on the built-in data and on
``dataset=controlled`` its mean validation Δm over three seeds was the higher and its spread
the smaller (within each other's intervals; docs/methods.md gives the numbers).

Deviations, all in corner cases the paper does not address: ``w`` is floored at 1e-6
before renormalising (an Adam step can otherwise push a weight below 0; a floored weight
has ``G_t = 0`` below its target and so climbs back); a non-finite gradient entry (a
non-finite loss or row) is treated as 0, so it skips the update instead of poisoning
``w``; ``L_t(0)`` and the mean ratio are clamped away from 0. Of LibMTL's variant we take
only the first epoch's mean as ``L(0)`` (``initial_loss=first_epoch``), not its softmax
parametrisation nor its use of the model optimizer for the weights.

State (``w``, ``L(0)``, the Adam moments and step) is in buffers: ``state_dict()``
resumes exactly. No host synchronisation in :meth:`weights` / :meth:`scale_rows`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtl_runner.optim.balancers.base import Balancer, GradRequirement, adam_step_
from mtl_runner.tasks import Task

_MIN_WEIGHT = 1e-6
_EPS = 1e-12


class GradNorm(Balancer):
    requires_grads: GradRequirement = "last_shared"

    def __init__(self, alpha: float = 1.5, lr: float = 0.025, initial_loss: str = "first_epoch") -> None:
        super().__init__()
        if alpha < 0:
            raise ValueError(f"balancer.alpha: must be >= 0, got {alpha}")
        if lr <= 0:
            raise ValueError(f"balancer.lr: must be > 0, got {lr}")
        if initial_loss not in ("first_step", "first_epoch"):
            raise ValueError(f"balancer.initial_loss: must be first_step or first_epoch, got {initial_loss!r}")
        self.alpha = float(alpha)
        self.initial_loss = initial_loss
        self.lr = float(lr)  # GradNorm's own Adam; ``w`` is a buffer, not a trainer param
        for name in ("task_weights", "initial_losses", "exp_avg", "exp_avg_sq"):
            self.register_buffer(name, torch.zeros(0))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("adam_step", torch.zeros((), dtype=torch.long))

    def setup(self, tasks: Sequence[Task], generator: torch.Generator | None) -> None:
        super().setup(tasks, generator)
        device, num = self.task_weights.device, len(self.tasks)
        self.task_weights = torch.ones(num, device=device)
        self.initial_losses = torch.ones(num, device=device)
        self.exp_avg = torch.zeros(num, device=device)
        self.exp_avg_sq = torch.zeros(num, device=device)
        self.initialized.fill_(False)
        self.adam_step.zero_()

    def weights(self, losses: Tensor) -> Tensor:
        self._follow(losses.device)
        return self.task_weights.to(losses.dtype).clone()

    def scale_rows(self, jacobian: Tensor, losses: Tensor, weights: Tensor) -> Tensor:
        self._follow(jacobian.device)
        used = weights.detach().to(jacobian.dtype)
        scaled = used[:, None] * jacobian

        w = self.task_weights
        current = losses.detach().to(w.dtype)
        started = self.initialized.clone()  # first_epoch: False until the first epoch's end
        if self.initial_loss == "first_step":
            # L(0): recorded at the first call, without a host-side branch.
            self.initial_losses.copy_(torch.where(self.initialized, self.initial_losses, current))
            self.initialized.fill_(True)
            started.fill_(True)

        norms = jacobian.detach().to(w.dtype).norm(dim=1)  # ||g_t||
        grad_norms = w * norms  # G_t
        ratio = current / self.initial_losses.clamp_min(_EPS)
        inverse_rate = ratio / ratio.mean().clamp_min(_EPS)
        target = grad_norms.mean() * inverse_rate.pow(self.alpha)
        grad_w = torch.sign(grad_norms - target) * norms  # d L_grad / d w_t
        grad_w = torch.where(torch.isfinite(grad_w) & started, grad_w, torch.zeros_like(grad_w))

        # Before re-weighting starts the gradient is 0, which leaves w and Adam's moments
        # as they are; the step count is put back so that Adam starts afresh afterwards.
        adam_step_(w, grad_w, self.exp_avg, self.exp_avg_sq, self.adam_step, lr=self.lr)
        self.adam_step.sub_((~started).long())
        w.clamp_(min=_MIN_WEIGHT)
        w.mul_(len(self.tasks) / w.sum())
        return scaled

    def epoch_end(self, mean_losses: Tensor) -> None:
        """``initial_loss=first_epoch``: the first epoch's mean losses become ``L(0)`` and
        re-weighting starts."""
        if self.initial_loss == "first_epoch" and not bool(self.initialized):
            self.initial_losses.copy_(mean_losses.detach().to(self.initial_losses))
            self.initialized.fill_(True)
