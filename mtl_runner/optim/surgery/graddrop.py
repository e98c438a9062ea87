"""``surgery=graddrop``: gradient sign dropout (Chen, Ngiam, Huang, Luong, Kretzschmar,
Chai, Anguelov, "Just Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign
Dropout", NeurIPS 2020, Algorithm 1)."""

from __future__ import annotations

import torch
from torch import Tensor

from mtl_runner.optim.surgery.base import Space, Surgery


class GradDrop(Surgery):
    """Per coordinate, the positive sign purity ``P = 0.5 (1 + sum_t g_t / sum_t |g_t|)``
    and one draw ``U ~ U(0, 1)`` decide which sign survives: where ``P > U`` only the
    positive entries of the rows are summed, elsewhere only the negative ones. With
    ``leak`` (the paper's leak parameter, equal for all tasks) a fraction of every
    gradient passes unmasked: ``d = sum_t (leak + (1 - leak) M_t) g_t``.

    Where the paper applies it: at a feature layer (the gradients of the shared
    activations, per activation element), before backpropagating into the encoder.
    Here, as issue 3 asks, it acts on ``J`` of the shared parameters (one purity per
    parameter), so it needs ``J`` itself and only ``space=params`` is offered. Scale:
    the paper's masked sum, which is the project's convention (no leak and agreeing
    signs give ``J.sum(0)``). ``U`` comes from the run's seeded generator, one draw of
    ``P``'s size per step. A coordinate where every row is 0 has ``P = 0.5`` (any
    choice gives 0). Rows with a non-finite entry are dropped, like in every method.
    """

    def __init__(self, leak: float = 0.0, space: Space = "params", task_subset: int | None = None) -> None:
        if not 0 <= leak <= 1:
            raise ValueError(f"surgery.leak must be in [0, 1], got {leak!r}")
        super().__init__(space, task_subset)
        self.leak = leak

    def __call__(self, jacobian: Tensor, losses: Tensor | None = None) -> Tensor:
        finite = torch.isfinite(jacobian).all(1, keepdim=True)
        jacobian = torch.where(finite, jacobian, torch.zeros_like(jacobian))
        total = jacobian.sum(0)
        magnitude = jacobian.abs().sum(0)
        purity = 0.5 * (1 + total / torch.where(magnitude > 0, magnitude, 1))
        positive = jacobian.clamp_min(0).sum(0)
        negative = jacobian.clamp_max(0).sum(0)
        kept = torch.where(purity > self._uniform(purity), positive, negative)
        self.last_weights = None  # a mask per coordinate, not a weight per task
        if self.leak == 0:
            return kept
        return self.leak * total + (1 - self.leak) * kept

    def _uniform(self, like: Tensor) -> Tensor:
        """``U(0, 1)`` of ``like``'s shape from the run's generator, moved to ``like``."""
        device = self.generator.device if self.generator is not None else like.device
        draw = torch.rand(like.shape, generator=self.generator, device=device, dtype=like.dtype)
        return draw.to(like.device)
