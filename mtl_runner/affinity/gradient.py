"""Gradient affinity: the mean cosine between two tasks' gradients on the shared parameters.

The cheapest of the three measures: the per-task gradients are the rows of the Jacobian
the engine computes anyway on a measured step (``wants_jacobian``), and the cosines come
from :func:`mtl_runner.diagnostics.cosine_matrix`, the same code as the conflict
diagnostics. Averaged over the measured steps of the joint run; symmetric, in [-1, 1],
1 on the diagonal. The sum stays on the device: one read at the end.
"""

from __future__ import annotations

from torch import Tensor

from mtl_runner.diagnostics import cosine_matrix
from mtl_runner.optim.jacobian import StepGradients
from mtl_runner.train.trainer import Callback, Trainer


class GradientAffinity(Callback):
    def __init__(self, every_n_steps: int) -> None:
        self.every_n_steps = every_n_steps
        self.total: Tensor | None = None
        self.steps = 0

    def wants_jacobian(self, step: int) -> bool:
        return step % self.every_n_steps == 0

    def on_step(self, trainer: Trainer, step: int, losses: Tensor, weights: Tensor, grads: StepGradients) -> None:
        if not self.wants_jacobian(step) or grads.jacobian is None:
            return
        cos = cosine_matrix(grads.jacobian)
        self.total = cos if self.total is None else self.total + cos
        self.steps += 1

    def matrix(self) -> Tensor:
        """``(T, T)`` mean cosines, float64 on the CPU."""
        if self.total is None:
            raise RuntimeError("gradient affinity: no step was measured")
        return (self.total / self.steps).cpu()
