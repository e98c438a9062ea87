"""``balancer=gradnorm``: GradNorm (Chen, Badrinarayanan, Lee & Rabinovich, "GradNorm:
Gradient Normalization for Adaptive Loss Balancing in Deep Multitask Networks", ICML 2018).

Learnable weights ``w_t`` (initialised to 1). Each step, on the last shared layer ``W``
(``requires_grads = "last_shared"``; the engine passes the *unweighted* rows
``g_t = grad_W L_t``):

* ``G_t = ||grad_W (w_t L_t)|| = w_t ||g_t||``, ``G_bar = mean_t G_t``;
* inverse training rate ``r_t = (L_t / L_t(0)) / mean_j (L_j / L_j(0))``, with ``L_t(0)``
  the losses of the first step this balancer sees;
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

Deviations, all in corner cases the paper does not address: ``w`` is floored at 1e-6
before renormalising (an Adam step can otherwise push a weight below 0; a floored weight
has ``G_t = 0`` below its target and so climbs back); a non-finite gradient entry (a
non-finite loss or row) is treated as 0, so it skips the update instead of poisoning
``w``; ``L_t(0)`` and the mean ratio are clamped away from 0. LibMTL's variant (softmax
parametrisation, ``L(0)`` from the first epoch's mean, updated by the model optimizer) is
not what we implement.

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

    def __init__(self, alpha: float = 1.5, lr: float = 0.025) -> None:
        super().__init__()
        if alpha < 0:
            raise ValueError(f"balancer.alpha: must be >= 0, got {alpha}")
        if lr <= 0:
            raise ValueError(f"balancer.lr: must be > 0, got {lr}")
        self.alpha = float(alpha)
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
        # L(0): recorded at the first call, without a host-side branch.
        self.initial_losses.copy_(torch.where(self.initialized, self.initial_losses, current))
        self.initialized.fill_(True)

        norms = jacobian.detach().to(w.dtype).norm(dim=1)  # ||g_t||
        grad_norms = w * norms  # G_t
        ratio = current / self.initial_losses.clamp_min(_EPS)
        inverse_rate = ratio / ratio.mean().clamp_min(_EPS)
        target = grad_norms.mean() * inverse_rate.pow(self.alpha)
        grad_w = torch.sign(grad_norms - target) * norms  # d L_grad / d w_t
        grad_w = torch.where(torch.isfinite(grad_w), grad_w, torch.zeros_like(grad_w))

        adam_step_(w, grad_w, self.exp_avg, self.exp_avg_sq, self.adam_step, lr=self.lr)
        w.clamp_(min=_MIN_WEIGHT)
        w.mul_(len(self.tasks) / w.sum())
        return scaled
