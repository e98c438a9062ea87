"""The state of one training step's backward, passed explicitly from the engine to the
gradient path that serves the step (nothing of a step lives on the engine)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

#: The shared representation ``z`` and each task's detached copy of it (see
#: :meth:`GradientEngine.forward`): where the forward split for per-task gradients.
Split = tuple[Tensor, dict[str, Tensor]]
#: Per task, its gradients of its own head parameters (None: not reached).
HeadGrads = list[list[Tensor | None]]


@dataclass
class StepGradients:
    """What one step's backward produced, for diagnostics and logging.

    ``jacobian`` holds the unweighted per-task gradient rows (shared parameters, or the
    shared representation in the features space) when the step computed them.
    ``surgery_weights`` are the effective per-task weights the surgery applied, where
    the method defines them.
    """

    jacobian: Tensor | None = None
    surgery_weights: Tensor | None = None


@dataclass(frozen=True)
class LossScale:
    """fp16 training's loss scale (``value``; None: no scaling). Gradients are taken of
    the scaled losses, so that half-precision activation gradients do not underflow,
    and divided by the scale as soon as they exist, so that the balancer, the surgery
    and ``.grad`` all see true gradients. Without a scale every method is the identity."""

    value: float | None = None

    def scaled(self, tensor: Tensor) -> Tensor:
        return tensor if self.value is None else tensor * self.value

    def seed(self, like: Tensor) -> Tensor | None:
        """The cotangent that starts a backward pass at a scalar loss (None: autograd's 1)."""
        return None if self.value is None else torch.full((), self.value, dtype=like.dtype, device=like.device)

    def unscale_grads_(self, params: Iterable[Tensor]) -> None:
        """Divide the ``.grad`` of ``params`` by the scale, in place."""
        if self.value is None:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            torch._foreach_div_(grads, self.value)

    def unscale_rows_(self, jacobian: Tensor, head_grads: HeadGrads) -> tuple[Tensor, HeadGrads]:
        """Rows and head gradients of the true losses; both are this step's own tensors,
        so they are divided in place."""
        if self.value is not None:
            jacobian.div_(self.value)
            for grads in head_grads:
                for g in grads:
                    if g is not None:
                        g.div_(self.value)
        return jacobian, head_grads


@dataclass(frozen=True)
class StepContext:
    """One step's inputs to the backward: the task losses and the balancer's weights
    (``weights`` keeps its graph for balancers that learn, ``w`` is detached), the loss
    values the balancer and surgery read (``observed``: under ddp the mean over ranks),
    the loss scale, where the forward split (None: it did not), and whether the step's
    callbacks read every task's row (``all_rows``: a diagnostics step; with a task subset
    the other steps compute the sampled rows only)."""

    losses: Tensor
    weights: Tensor
    observed: Tensor
    scale: LossScale
    split: Split | None
    all_rows: bool = False

    @property
    def w(self) -> Tensor:
        return self.weights.detach()
