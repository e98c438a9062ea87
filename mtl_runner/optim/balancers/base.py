"""Common interface of loss balancers.

A balancer decides the magnitude of each task's contribution: ``weights(losses) -> w``
with ``w_t >= 0`` and the convention that ``uniform`` gives all ones (the loss is
``sum_t w_t L_t``). It owns any learnable state (log-variances, GradNorm's weights,
FAMO's logits) as ``nn.Parameter``s or buffers, so ``state_dict()`` carries it into
checkpoints.

How the engine drives a balancer in one training step:

1. ``w = balancer.weights(losses)`` with the ``(T,)`` loss vector, still attached to the
   graph. The model's gradients use ``w.detach()``; a balancer whose weights are
   learnable by the task loss (uncertainty) returns weights with a graph to its
   parameters, and the engine back-propagates ``(w * losses.detach()).sum() +
   balancer.regularizer()`` into them.
2. If ``requires_grads`` is not None the engine computes the unweighted per-task
   gradients ``J`` (rows ``grad L_t``) of the requested shared parameters
   (``"last_shared"``: the last shared layer only; ``"shared"``: all shared parameters)
   and calls ``rows = balancer.scale_rows(J, losses, w)``; the default is ``w[:, None] * J``.
   Gradient-based methods (GradNorm, DB-MTL) update their state there.
3. After ``optimizer.step()`` the trainer calls ``balancer.after_step(...)`` and, at the
   end of each epoch, ``balancer.epoch_end(mean_losses)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from mtl_runner.tasks import Task

GradRequirement = Literal["last_shared", "shared"] | None


class Balancer(nn.Module):
    requires_grads: GradRequirement = None

    def __init__(self) -> None:
        super().__init__()
        self.task_names: tuple[str, ...] = ()
        self.tasks: tuple[Task, ...] = ()
        self.generator: torch.Generator | None = None

    def setup(self, tasks: Sequence[Task], generator: torch.Generator | None) -> None:
        """Called once before training with the dataset's tasks and the run's seeded RNG.
        Subclasses that size parameters by ``T`` create them here (call super first)."""
        self.tasks = tuple(tasks)
        self.task_names = tuple(t.name for t in tasks)
        self.generator = generator

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def weights(self, losses: Tensor) -> Tensor:
        raise NotImplementedError

    def regularizer(self) -> Tensor | None:
        """A term added to the balancer's own objective (uncertainty's ``0.5 * sum s_t``)."""
        return None

    def scale_rows(self, jacobian: Tensor, losses: Tensor, weights: Tensor) -> Tensor:
        return weights.detach().to(jacobian.dtype)[:, None] * jacobian

    def after_step(self, recompute_losses: Callable[[], Tensor]) -> None:
        """After ``optimizer.step()``; ``recompute_losses()`` re-evaluates this batch's
        losses with the updated model (used by FAMO, costs one forward)."""

    def epoch_end(self, mean_losses: Tensor) -> None:
        """With the epoch-mean training loss of each task (used by DWA)."""

    def extra_scalars(self) -> dict[str, Tensor]:
        """Additional per-task quantities to log (e.g. ``sigma/<task>``), as tensors."""
        return {}
