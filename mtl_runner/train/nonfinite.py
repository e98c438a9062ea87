"""The non-finite guard: the one place that decides whether a step's update is kept.

A step whose losses or gradient norm are NaN or infinite is skipped: its gradients are
dropped, the optimizer does not move, ``FitState.nonfinite_steps`` counts it, and
``trainer.on_nonfinite`` / ``trainer.max_nonfinite_steps`` decide when the run stops.
Under fp16 an overflow of the scaled gradients backs the loss scale off instead. The
gradient norm is clipped here too (``trainer.grad_clip_norm``), since it is computed
here anyway.

The verdict reaches the host in one of two ways, with the same accounting
(:meth:`NonFiniteGuard._settle`):

- on the host, one synchronisation per step (as ``torch.amp.GradScaler`` does);
- on the device, for fused optimizers, whose kernels read a ``found_inf`` flag and skip
  the update there without the host waiting; the host settles the skipped steps later
  (:meth:`NonFiniteGuard.settle_pending`: at the logging interval, at epoch ends and
  before a checkpoint). Steps whose callbacks read the result at once (a Jacobian step)
  take the host path.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
import torch
from torch import Tensor

from mtl_runner.config import TrainerConfig
from mtl_runner.tasks import Task
from mtl_runner.train.precision import LossScaler
from mtl_runner.train.state import FitState


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with non-finite losses or gradients."""


@dataclass(frozen=True)
class Verdict:
    """``applied``: whether the update went through as far as the host knows now;
    ``finite``: on the device path, the step's 0-d verdict (the update was masked on the
    device where it is False); ``None`` when the host decided."""

    applied: bool
    finite: Tensor | None


class NonFiniteGuard:
    def __init__(self, tasks: tuple[Task, ...], optimizer: torch.optim.Optimizer, settings: TrainerConfig,
                 scaler: LossScaler | None, device: torch.device) -> None:
        self.tasks = tasks
        self.device = device
        self.optimizer = optimizer
        self.settings = settings
        self.scaler = scaler
        self.on_device = (
            scaler is None
            and getattr(optimizer, "_step_supports_amp_scaling", False)
            and all(group.get("fused") for group in optimizer.param_groups)
        )
        self._pending: list[tuple[int, Tensor]] = []

    def check(self, state: FitState, step: int, losses: Tensor, on_host: bool) -> Verdict:
        """The verdict on this step's gradients, before the optimizer steps. ``on_host``:
        the caller needs it now, even where the device could keep it."""
        flags = torch.cat([torch.isfinite(losses.detach()), torch.isfinite(self._clipped_grad_norm()).reshape(1)])
        if self.on_device and not on_host:
            finite = flags.all()
            self.optimizer.found_inf = (~finite).float()  # type: ignore[attr-defined]
            self._pending.append((step, flags))
            return Verdict(True, finite)
        if self.on_device:
            self.optimizer.found_inf = None  # type: ignore[attr-defined]
        return Verdict(self._settle(state, step, flags.tolist(), already_stepped=False), None)

    def settle_pending(self, state: FitState) -> None:
        """Account for the steps the device path has judged since the last call (one sync)."""
        if not self._pending:
            return
        steps = [step for step, _ in self._pending]
        flags = torch.stack([f for _, f in self._pending]).tolist()
        self._pending.clear()
        for step, step_flags in zip(steps, flags):
            self._settle(state, step, step_flags, already_stepped=True)

    def _settle(self, state: FitState, step: int, flags: list[bool], already_stepped: bool) -> bool:
        """Whether the step is kept; ``flags``: one per task loss, then the gradient norm's.
        ``already_stepped``: the device path ran the (masked) update and counted the batch
        in the epoch's mean; a skipped one is taken out of it again."""
        losses_finite = all(flags[:-1])
        finite = losses_finite and flags[-1]
        if self.scaler is not None and losses_finite and self.scaler.update(finite):
            self.optimizer.zero_grad(set_to_none=True)
            state.overflow_steps += 1
            return False
        if finite:
            state.consecutive_nonfinite = 0
            return True
        if already_stepped:
            state.epoch_batches -= 1
        else:
            self.optimizer.zero_grad(set_to_none=True)
        self._record(state, step, flags[:-1])
        return False

    def _record(self, state: FitState, step: int, losses_finite: list[bool]) -> None:
        """Count a skipped step; stop the run when ``trainer.on_nonfinite`` says so."""
        state.nonfinite_steps += 1
        state.consecutive_nonfinite += 1
        bad = [t.name for t, ok in zip(self.tasks, losses_finite) if not ok]
        where = f"loss of task {', '.join(bad)}" if bad else "gradients"
        message = f"step {step}: non-finite {where}"
        settings = self.settings
        if settings.on_nonfinite == "stop" or state.consecutive_nonfinite >= settings.max_nonfinite_steps:
            raise NonFiniteError(
                f"{message} ({state.consecutive_nonfinite} consecutive; trainer.on_nonfinite={settings.on_nonfinite}, "
                f"trainer.max_nonfinite_steps={settings.max_nonfinite_steps})"
            )
        warnings.warn(f"{message}; step skipped ({state.nonfinite_steps} so far)", RuntimeWarning, stacklevel=4)

    def _clipped_grad_norm(self) -> Tensor:
        """The global gradient norm, clipped to ``trainer.grad_clip_norm`` when set."""
        params = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        if self.settings.grad_clip_norm is not None:
            return torch.nn.utils.clip_grad_norm_(params, self.settings.grad_clip_norm)
        if not params:
            return torch.zeros((), device=self.device)
        return torch.nn.utils.get_total_norm([p.grad for p in params])
