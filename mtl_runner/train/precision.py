"""Mixed precision: ``trainer.precision=32|bf16|fp16``.

``bf16`` and ``fp16`` run the forward and the losses under :func:`torch.autocast`; the
parameters, their gradients, the per-task Jacobian and the optimizer state stay in
float32. ``fp16`` also needs loss scaling: small activation gradients underflow in half
precision. PyTorch's ``GradScaler`` unscales ``.grad`` right before the optimizer step,
which is too late here: a surgery method must see the true per-task gradients (Nash-MTL's
direction, for one, does not scale with ``J``). So the gradient engine differentiates the
scaled losses and divides every gradient it produces by the scale before surgery acts;
:class:`LossScaler` only owns the scale and its dynamics (GradScaler's: back off by half
on an overflow and skip that step, grow by 2 after ``growth_interval`` clean steps).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

_AUTOCAST_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """The context of the forward pass and the losses for ``precision``."""
    if precision == "32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_AUTOCAST_DTYPE[precision])


class LossScaler:
    """The dynamic loss scale of fp16 training, held on the host: the trainer already
    learns on the host whether a step's gradients are finite (its non-finite guard), so
    keeping the scale there costs no extra synchronisation."""

    def __init__(self, init_scale: float = 2.0**16, growth_interval: int = 2000, min_scale: float = 1.0) -> None:
        self.scale = init_scale
        self.growth_interval = growth_interval
        self.min_scale = min_scale
        self._clean_steps = 0

    def update(self, finite: bool) -> bool:
        """Record a step's outcome; True when an overflow was absorbed by backing off
        (the step is skipped, and it is not a training failure)."""
        if finite:
            self._clean_steps += 1
            if self._clean_steps >= self.growth_interval:
                self.scale *= 2.0
                self._clean_steps = 0
            return False
        self._clean_steps = 0
        if self.scale / 2.0 < self.min_scale:
            return False  # the scale cannot explain it any more: a genuine non-finite step
        self.scale /= 2.0
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "clean_steps": self._clean_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale = state["scale"]
        self._clean_steps = state["clean_steps"]
