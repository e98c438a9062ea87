"""The learning-rate schedule (``trainer.lr_schedule``): the factor on the optimizer's
rates at each step, after ``trainer.warmup_epochs`` of linear warm-up."""

from __future__ import annotations

import math

from mtl_runner.config import TrainerConfig


def lr_factor(settings: TrainerConfig, steps_per_epoch: int, step: int) -> float:
    warmup = settings.warmup_epochs * steps_per_epoch
    if step < warmup:
        return (step + 1) / warmup
    if settings.lr_schedule == "constant":
        return 1.0
    if settings.lr_schedule == "step":  # MTAN/LibMTL's StepLR, counted in epochs
        return settings.lr_step_gamma ** (step // steps_per_epoch // settings.lr_step_epochs)
    total_steps = steps_per_epoch * settings.epochs
    progress = (step - warmup) / max(1, total_steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
