"""``balancer=famo``: Fast Adaptive Multitask Optimization (Liu, Feng, Stone & Liu,
"FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023; official code
github.com/Cranial-XIX/FAMO).

FAMO keeps task logits ``xi`` (initialised to 0), ``z = softmax(xi)``, and descends the
log-losses with the ``z``-weighted, normalised direction

    d = c sum_t z_t grad log L_t = sum_t (c z_t / L_t) grad L_t,   c = (sum_t z_t / L_t)^-1,

i.e. the loss weights are ``z_t / (L_t c)``. After the model step it measures how much each
log-loss fell on the *same batch*, ``delta_t = log L_t(theta_old) - log L_t(theta_new)``
(:meth:`after_step` calls ``recompute_losses()``, one extra forward pass), and updates the
logits with the gradient ``J_softmax(xi)^T delta`` plus weight decay ``gamma xi``: a task
whose log-loss fell faster than the others loses weight, so all log-losses fall at about
the same rate. ``L_t`` above is ``L_t - L_t^* + 1e-8`` with lower bound ``L_t^* = 0``
(the official default).

As in the official implementation, the logits are updated by Adam (default betas/eps)
with ``lr = 0.025`` and L2 weight decay ``gamma = 0.01`` (the defaults of the official
``famo.py`` and ``experiments/utils.py``; gamma is tuned per benchmark in the paper, and
LibMTL defaults to 1e-5). Algorithm 1 of the paper writes the same update as plain
gradient descent, ``xi <- xi - beta (J_z^T delta + gamma xi)``; the published experiments
ran the official code, i.e. Adam, which is what we follow.

Scale (deviation, documented): the official weights ``z_t / (L_t c)`` sum to 1; we return
``T`` times them, ``w = T softmax(xi - log L)``, so that equal logits and equal losses give
``uniform`` (all ones), the project convention. Under SGD the official version is ours
with a ``T`` times smaller learning rate (Adam is insensitive to it).

Not implemented here: the official ``backward`` also clips the shared gradient to norm
``max_norm = 1``; use the trainer's gradient clipping for that. Non-finite recomputed
losses give ``delta = 0`` for that task (no update) instead of poisoning the logits.

State (the logits, the losses of the current step, the Adam moments and step) is in
buffers, so ``state_dict()`` resumes exactly. No host synchronisation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from mtl_runner.optim.balancers.base import Balancer, adam_step_
from mtl_runner.tasks import Task

_EPS = 1e-8  # as in the official code: log(L - L* + 1e-8)


class FAMO(Balancer):
    def __init__(self, lr: float = 0.025, gamma: float = 0.01) -> None:
        super().__init__()
        if lr <= 0:
            raise ValueError(f"balancer.lr: must be > 0, got {lr}")
        if gamma < 0:
            raise ValueError(f"balancer.gamma: must be >= 0, got {gamma}")
        self.lr = float(lr)  # FAMO's own Adam; the logits are buffers, not trainer params
        self.gamma = float(gamma)
        for name in ("logits", "step_losses", "exp_avg", "exp_avg_sq"):
            self.register_buffer(name, torch.zeros(0))
        self.register_buffer("has_step_losses", torch.zeros((), dtype=torch.bool))
        self.register_buffer("adam_step", torch.zeros((), dtype=torch.long))

    def setup(self, tasks: Sequence[Task], generator: torch.Generator | None) -> None:
        super().setup(tasks, generator)
        device, num = self.logits.device, len(self.tasks)
        self.logits = torch.zeros(num, device=device)
        self.step_losses = torch.ones(num, device=device)
        self.exp_avg = torch.zeros(num, device=device)
        self.exp_avg_sq = torch.zeros(num, device=device)
        self.has_step_losses.fill_(False)
        self.adam_step.zero_()

    @staticmethod
    def _log(losses: Tensor) -> Tensor:
        return torch.log(losses.clamp_min(0.0) + _EPS)

    def weights(self, losses: Tensor) -> Tensor:
        self._follow(losses.device)
        current = losses.detach().to(self.logits.dtype)
        self.step_losses.copy_(current)
        self.has_step_losses.fill_(True)
        log_losses = torch.nan_to_num(self._log(current), nan=0.0)
        # T z_t / (L_t c) = T softmax(xi - log L): stable for any loss magnitude.
        w = len(self.tasks) * torch.softmax(self.logits - log_losses, dim=0)
        return w.to(losses.dtype)

    def after_step(self, recompute_losses: Callable[[], Tensor]) -> None:
        with torch.no_grad():
            new = recompute_losses().detach().to(self.logits)
        delta = self._log(self.step_losses) - self._log(new)
        ok = torch.isfinite(delta) & self.has_step_losses
        delta = torch.where(ok, delta, torch.zeros_like(delta))
        z = torch.softmax(self.logits, dim=0)
        grad = z * (delta - (z * delta).sum())  # J_softmax(xi)^T delta
        adam_step_(
            self.logits, grad, self.exp_avg, self.exp_avg_sq, self.adam_step,
            lr=self.lr, weight_decay=self.gamma,
        )
        self.has_step_losses.fill_(False)

    def extra_scalars(self) -> dict[str, Tensor]:
        z = torch.softmax(self.logits, dim=0)
        return {f"famo_z/{name}": z[i] for i, name in enumerate(self.task_names)}
