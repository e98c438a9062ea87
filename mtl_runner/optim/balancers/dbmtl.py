"""``balancer=dbmtl``: Dual-Balancing Multi-Task Learning (Lin, Jiang, Ye, Zhang, Chen,
Chen, Liu & Kwok, "Dual-Balancing for Multi-Task Learning", arXiv 2308.12029, 2023;
reference implementation LibMTL ``weighting/DB_MTL.py``).

Two balancing steps, both in :meth:`scale_rows` (``requires_grads = "shared"``: the
engine passes the unweighted per-task gradients ``g_t = grad L_t`` of all shared
parameters):

1. loss-scale balancing by the log transform: each task is trained on ``log(L_t + 1e-8)``,
   whose gradient is ``g_t / (L_t + 1e-8)``, which is invariant to rescaling ``L_t``;
2. gradient-magnitude balancing: an exponential moving average of those log-gradients,
   ``ghat_t <- beta_k ghat_t + (1 - beta_k) grad log L_t`` with ``beta_k = beta /
   k^beta_sigma`` (step ``k`` from 1, ``ghat = 0`` before the first step), and each
   EMA row rescaled to the largest EMA norm: ``row_t = (max_j ||ghat_j|| / ||ghat_t||)
   ghat_t``. The shared update is their sum.

:meth:`weights` returns ``1 / (L_t + 1e-8)``: the task-specific parameters (heads) get the
plain gradient of ``log L_t``, as in LibMTL, where every head receives the gradient of its
own log-loss. These are the logged ``weight/<task>``; the per-task gradient scale applied
on the shared parameters (``max_j ||ghat_j|| / ||ghat_t||``) is logged as
``dbmtl_scale/<task>`` by :meth:`extra_scalars`.

Scale: every returned row has norm ``max_t ||ghat_t||`` and ``surgery=none`` sums them,
exactly LibMTL's shared gradient (a sum over tasks, like ``uniform``). Defaults ``beta =
0.9``, ``beta_sigma = 0`` are LibMTL's; the paper searches both per benchmark.

Note that the returned rows are built from the EMA, not from this step's ``g_t`` alone, so
they are not ``w[:, None] * J`` for any ``w``.

State: the EMA ``(T, P)`` is sized lazily at the first call (``P`` is only known then); it
and the step count are buffers, and :meth:`_load_from_state_dict` resizes the EMA to the
checkpoint's shape so a fresh balancer resumes exactly. Non-finite gradient entries are
treated as 0 so that one bad step cannot poison the EMA. No host synchronisation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mtl_runner.optim.balancers.base import Balancer, GradRequirement

_EPS = 1e-8  # LibMTL: log(L + 1e-8) and the norm ratio's 1e-8


class DBMTL(Balancer):
    requires_grads: GradRequirement = "shared"

    def __init__(self, beta: float = 0.9, beta_sigma: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"balancer.beta: must be in [0, 1), got {beta}")
        if beta_sigma < 0:
            raise ValueError(f"balancer.beta_sigma: must be >= 0, got {beta_sigma}")
        self.beta = float(beta)
        self.beta_sigma = float(beta_sigma)
        self.register_buffer("grad_ema", torch.zeros(0, 0))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("scales", torch.ones(0))

    def weights(self, losses: Tensor) -> Tensor:
        return 1.0 / (losses.detach().clamp_min(0.0) + _EPS)

    def scale_rows(self, jacobian: Tensor, losses: Tensor, weights: Tensor) -> Tensor:
        self._follow(jacobian.device)
        if self.grad_ema.shape != jacobian.shape:  # metadata only: no sync
            self.grad_ema = torch.zeros(jacobian.shape, dtype=torch.float32, device=jacobian.device)
            self.step.zero_()
        current = losses.detach().to(self.grad_ema.dtype).clamp_min(0.0)
        log_grads = jacobian.detach().to(self.grad_ema.dtype) / (current + _EPS)[:, None]
        log_grads = torch.where(torch.isfinite(log_grads), log_grads, torch.zeros_like(log_grads))

        self.step.add_(1)
        beta_k = self.beta / self.step.to(self.grad_ema.dtype).pow(self.beta_sigma)
        # ghat <- beta_k ghat + (1 - beta_k) g, written as LibMTL does.
        self.grad_ema.copy_(log_grads + beta_k * (self.grad_ema - log_grads))

        norms = self.grad_ema.norm(dim=1)
        scales = norms.max() / (norms + _EPS)
        self.scales = scales
        return (scales[:, None] * self.grad_ema).to(jacobian.dtype)

    def extra_scalars(self) -> dict[str, Tensor]:
        if self.scales.numel() != len(self.task_names):
            return {}
        return {f"dbmtl_scale/{name}": self.scales[i] for i, name in enumerate(self.task_names)}

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any],
        strict: bool, missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str],
    ) -> None:
        # The EMA and the logged scales are sized lazily: adopt the checkpoint's shape.
        for name in ("grad_ema", "scales"):
            key = prefix + name
            if key in state_dict and state_dict[key].shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(state_dict[key], device=getattr(self, name).device))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
