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

Lifecycle: ``balancer.setup(tasks, generator)`` creates the per-task state (on the device
the balancer was moved to, if ``.to(device)`` came first; stateful balancers also move
themselves to the losses' device on first use, :meth:`Balancer._follow`, so either order
works). ``load_state_dict`` must come after ``setup`` (the state is sized there; lazily
sized state, like DB-MTL's gradient EMA, adopts the checkpoint's shape). The trainer's
optimizer, built after ``setup``, takes the ``requires_grad`` parameters (uncertainty's
log-variances) in their own group with weight decay 0 and ``lr = balancer.lr`` when that
attribute exists and is not None. State a balancer adapts itself (GradNorm's weights,
FAMO's logits, DWA's epoch losses, DB-MTL's EMA) lives in buffers, so ``.to()`` moves it
and ``state_dict()`` carries it. A balancer that owns an optimizer keeps that optimizer's
state in buffers too (:func:`adam_step_`): a ``torch.optim`` object lives outside the
module, so it would neither follow ``.to(device)`` nor appear in ``state_dict()``.
Randomness comes only from ``self.generator`` (the run's seeded generator, which the
trainer checkpoints). ``weights``, ``scale_rows`` and ``after_step`` never read a tensor
back to the host.
"""

from __future__ import annotations

import itertools
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

    def _follow(self, device: torch.device) -> None:
        """Move this balancer's state to ``device`` if it lives elsewhere (a host-side
        metadata check, no synchronisation). Covers an engine that calls ``.to(device)``
        before ``setup`` created the state."""
        first = next(itertools.chain(self.parameters(), self.buffers()), None)
        if first is not None and first.device != device:
            self.to(device)


def adam_step_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: Tensor,
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> None:
    """One step of Adam (Kingma & Ba 2015, with ``torch.optim.Adam``'s L2-style
    ``weight_decay``: the decay is added to the gradient), in place, on buffers.

    Used by balancers that own an optimizer (GradNorm's weights, FAMO's logits): the
    moments and the step count are the balancer's registered buffers, so they follow
    ``.to(device)`` and round-trip through ``state_dict()``. Everything stays on the
    device (``step`` is a 0-dim tensor): no host synchronisation.
    """
    beta1, beta2 = betas
    grad = grad.to(param.dtype)
    if weight_decay != 0.0:
        grad = grad + weight_decay * param
    step.add_(1)
    exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    t = step.to(param.dtype)
    bias_correction1 = 1.0 - beta1**t
    bias_correction2 = 1.0 - beta2**t
    denom = exp_avg_sq.sqrt() / bias_correction2.sqrt() + eps
    param.sub_(lr * exp_avg / (bias_correction1 * denom))
