"""Lookahead inter-task affinity (TAG: Fifty et al., "Efficiently Identifying Task
Groupings for Multi-Task Learning", NeurIPS 2021).

On a measured step with shared parameters ``theta_s`` and batch ``X``, a lookahead step
on task ``i``'s loss alone, ``theta_s' = theta_s - lr * grad_{theta_s} L_i(X)``, changes
task ``j``'s loss on the same batch by

    Z_{i->j} = 1 - L_j(X; theta_s', theta_j) / L_j(X; theta_s, theta_j)

(positive: a step for ``i`` helps ``j``). ``Z`` is averaged over the measured steps of the
joint run. Rows are the stepped (source) task, columns the affected (target) task; the
diagonal is each task's own lookahead gain.

The task gradients are the unweighted rows of the Jacobian the engine already computed
for the training step at ``theta`` (no extra backward pass); the ``T + 1`` loss
evaluations run through :func:`torch.func.functional_call` on a snapshot of the
parameters taken before the optimiser step, so the model itself is never copied or
modified. Evaluations run in training mode (batch statistics for BatchNorm, as the
training step saw) on cloned buffers, so running statistics are left untouched; with
dropout the masks differ between evaluations, which adds noise to ``Z``.

The lookahead is a plain SGD step as in the paper's definition, whatever the run's
optimiser: ``affinity.lookahead_lr`` sets ``lr`` (default: the optimiser's lr).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from mtl_runner.data.base import Batch
from mtl_runner.models.sharing.base import SharingModel
from mtl_runner.train.trainer import Trainer


class _Predict(nn.Module):
    """``model.predict`` as a module's forward, so ``functional_call`` serves
    single-input and multi-input (dict) batches alike."""

    def __init__(self, model: SharingModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: Any) -> dict[str, Tensor]:
        return self.model.predict(inputs)


class LookaheadAffinity:
    """Measures ``Z`` around the steps of ``trainer``: the caller takes a
    :meth:`snapshot` before a measured step and hands it to :meth:`measure` after it,
    with the step's Jacobian (the trainer's callbacks must ask for it on that step)."""

    def __init__(self, trainer: Trainer, lr: float, every_n_steps: int) -> None:
        self.trainer = trainer
        self.lr = lr
        self.every_n_steps = every_n_steps
        self.module = _Predict(trainer.model)
        names = {id(p): name for name, p in self.module.named_parameters()}
        self.parameter_names = frozenset(names.values())
        #: The engine's shared parameters, in the column order of its Jacobian.
        self.shared = [(names[id(p)], p.shape, p.numel()) for p in trainer.engine.shared]
        self.total: Tensor | None = None
        self.steps = 0

    def measures_step(self, step: int) -> bool:
        return step % self.every_n_steps == 0

    def snapshot(self) -> dict[str, Tensor]:
        """Detached copies of every parameter and buffer: ``theta`` before the step."""
        state = dict(self.module.named_parameters())
        state.update(dict(self.module.named_buffers()))
        return {name: t.detach().clone() for name, t in state.items()}

    @torch.no_grad()
    def measure(self, before: dict[str, Tensor], batch: Batch, jacobian: Tensor) -> Tensor:
        """Add this step's ``Z`` (``T x T``) to the running sum and return it."""
        inputs, targets = batch
        self.module.train()
        base = self._losses(before, inputs, targets)
        rows = []
        for g in jacobian:
            stepped = dict(before)
            offset = 0
            for name, shape, n in self.shared:
                stepped[name] = before[name] - self.lr * g[offset : offset + n].view(shape).to(before[name].dtype)
                offset += n
            rows.append(self._losses(stepped, inputs, targets))
        z = 1.0 - torch.stack(rows) / base.clamp_min(torch.finfo(base.dtype).tiny)
        self.total = z if self.total is None else self.total + z
        self.steps += 1
        return z

    def _losses(self, state: dict[str, Tensor], inputs: Any, targets: dict[str, Tensor]) -> Tensor:
        # Buffers are cloned per call: a training-mode forward updates running statistics in place.
        call_state = {k: v if k in self.parameter_names else v.clone() for k, v in state.items()}
        outputs = functional_call(self.module, call_state, (inputs,))
        return self.trainer.compute_losses(outputs, targets).double()

    def matrix(self) -> Tensor:
        """``(T, T)`` mean ``Z_{i->j}``, float64 on the CPU."""
        if self.total is None:
            raise RuntimeError("lookahead affinity: no step was measured")
        return (self.total / self.steps).cpu()
