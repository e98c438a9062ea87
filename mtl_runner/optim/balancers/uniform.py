"""``balancer=uniform``: every task weighs 1, so the loss is ``sum_t L_t``."""

from __future__ import annotations

import torch
from torch import Tensor

from mtl_runner.optim.balancers.base import Balancer


class Uniform(Balancer):
    def weights(self, losses: Tensor) -> Tensor:
        return torch.ones_like(losses)
