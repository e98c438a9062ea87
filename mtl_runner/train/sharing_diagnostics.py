"""Log what a sharing strategy reports about itself (:meth:`SharingModel.diagnostics`).

Every ``log_every_n_steps`` training steps (the interval of the training losses) the
model's diagnostics go to TensorBoard under their own tags: cross-stitch units
(``cross_stitch/stage<j>/<t>~<s>``), MMoE gate usage (``mmoe/<task>/expert<e>``), the
soft-sharing penalty as its own loss term (``loss/train/soft_penalty``) and the
copies' distance (``soft/distance``). The values stay on the device until the logger's
next flush: no host synchronisation per step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtl_runner.optim.jacobian import StepGradients
from mtl_runner.train.trainer import Callback, Trainer


class SharingDiagnostics(Callback):
    def on_step(self, trainer: Trainer, step: int, losses: Tensor, weights: Tensor, grads: StepGradients) -> None:
        if step % trainer.settings.log_every_n_steps:
            return
        values = trainer.model.diagnostics()
        if values:
            trainer.logger.scalars(list(values), torch.stack([v.detach().float().reshape(()) for v in values.values()]), step)
