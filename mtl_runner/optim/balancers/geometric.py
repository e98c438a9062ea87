"""``balancer=geometric``: Geometric Loss Strategy (GLS; Chennupati, Sistu, Yogamani &
Rawashdeh, "MultiNet++: Multi-Stream Feature Aggregation and Geometric Loss Strategy for
Multi-Task Learning", CVPR Workshops 2019).

GLS minimises the geometric mean of the task losses, ``(prod_t L_t)^(1/T)``. Because the
geometric mean is scale-free per task (multiplying ``L_t`` by ``c`` multiplies the objective
by ``c^(1/T)`` but leaves every other task's relative pull unchanged), it balances tasks
of very different magnitudes.

The engine works with weights on ``sum_t w_t L_t``, so we return the weights whose
weighted gradient equals the gradient of the objective at the current losses:

    d/dL_t [T (prod_j L_j)^(1/T)] = (prod_j L_j)^(1/T) / L_t = exp(mean_j log L_j - log L_t).

Scale: we differentiate ``T`` times the geometric mean (the paper and LibMTL's ``GLS``
back-propagate the geometric mean itself, whose weights are ``1/T`` of ours). With this
choice equal losses give ``w_t = 1``, i.e. exactly ``uniform``, matching the project
convention ``uniform = sum_t L_t``; under SGD the paper's version is ours with a ``T``
times smaller learning rate.

Numerics: computed in log space on detached losses clamped at 1e-20, so tiny or zero
losses give large but finite weights (``e^(mean_j log L_j - log 1e-20)``, capped at ``e^80``
so the float32 result stays finite even for absurd loss ranges) and never NaN; the cap
only binds when losses span more than ~35 orders of magnitude.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtl_runner.optim.balancers.base import Balancer

_FLOOR = 1e-20
_MAX_EXPONENT = 80.0  # e^80 ~ 5.5e34 < float32 max


class Geometric(Balancer):
    def weights(self, losses: Tensor) -> Tensor:
        work_dtype = torch.promote_types(losses.dtype, torch.float32)
        log_losses = losses.detach().to(work_dtype).clamp_min(_FLOOR).log()
        log_losses = torch.nan_to_num(log_losses, nan=0.0, posinf=80.0)
        w = torch.exp((log_losses.mean() - log_losses).clamp(max=_MAX_EXPONENT))
        return w.to(losses.dtype)
