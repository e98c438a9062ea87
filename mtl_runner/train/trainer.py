"""The training loop: one place for every dataset, sharing strategy, balancer and surgery.

Per step: forward, the task-loss vector, the balancer's weights, the engine's backward
(fast path or per-task gradients), the optimizer step. Losses and metrics accumulate on
the device; the host reads them only at logging intervals and epoch ends.

Extensions (diagnostics, sharing diagnostics) plug in as :class:`Callback` objects
instead of growing the loop.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mtl_runner import io
from mtl_runner.checkpoints import LAST_NAME
from mtl_runner.data.base import Batch, Split, TaskSet
from mtl_runner.models.sharing.base import SharingModel
from mtl_runner.optim.balancers.base import Balancer
from mtl_runner.optim.jacobian import GradientEngine, StepGradients
from mtl_runner.optim.surgery.base import Surgery
from mtl_runner.train.distributed import DataParallel
from mtl_runner.train.logger import RunLogger
from mtl_runner.train.precision import PRECISIONS, LossScaler, autocast
from mtl_runner.train.progress import Progress


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with non-finite losses or gradients."""


class Callback:
    """Hooks into the loop. ``wants_jacobian(step)`` asks the engine for per-task
    gradients on that step (e.g. a diagnostics step). State a callback accumulates
    across steps goes into checkpoints through ``state_dict``/``load_state_dict``."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state

    def wants_jacobian(self, step: int) -> bool:
        return False

    def on_fit_start(self, trainer: Trainer) -> None:
        """Before the first step of ``fit`` (after a resume has restored the state)."""

    def on_step(self, trainer: Trainer, step: int, losses: Tensor, weights: Tensor, grads: StepGradients) -> None:
        pass

    def on_epoch_end(self, trainer: Trainer, epoch: int) -> None:
        pass

    def on_fit_end(self, trainer: Trainer) -> None:
        pass


@dataclass
class TrainerSettings:
    epochs: int = 8
    batch_size: int = 32
    eval_batch_size: int = 256
    seed: int = 0
    lr_schedule: str = "cosine"
    warmup_epochs: int = 0
    lr_step_epochs: int = 100
    lr_step_gamma: float = 0.5
    jacobian: str = "auto"
    log_every_n_steps: int = 10
    progress: str = "auto"
    checkpoint_every_n_steps: int = 0
    on_nonfinite: str = "skip"
    max_nonfinite_steps: int = 10
    grad_clip_norm: float | None = None
    precision: str = "32"
    compile: bool = False
    channels_last: str = "auto"


@dataclass
class EvalResult:
    losses: dict[str, float]
    metrics: dict[str, dict[str, float]]


@dataclass
class FitState:
    """Counters that a checkpoint carries. ``batch_in_epoch`` > 0 marks a checkpoint taken
    mid-epoch: resuming replays that epoch's batch order from ``epoch_data_state`` and
    continues after the batches already trained on."""

    epoch: int = 0
    step: int = 0
    batch_in_epoch: int = 0
    epoch_data_state: Tensor | None = None
    epoch_loss_sum: Tensor | None = None
    epoch_batches: int = 0
    nonfinite_steps: int = 0
    consecutive_nonfinite: int = 0
    overflow_steps: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def last_step(self) -> int:
        """The index of the last completed step: epoch-level events are logged there, so a
        resume that purges events from its own first step on never drops them."""
        return self.step - 1


class Trainer:
    def __init__(
        self,
        model: SharingModel,
        taskset: TaskSet,
        balancer: Balancer,
        surgery: Surgery,
        optimizer_factory: Callable[[list[dict[str, Any]]], torch.optim.Optimizer],
        settings: TrainerSettings,
        device: torch.device,
        logger: RunLogger | None = None,
        checkpoint_dir: Path | None = None,
        callbacks: Sequence[Callback] = (),
        name: str = "mtl",
        config: dict[str, Any] | None = None,
        param_groups: list[dict[str, Any]] | None = None,
        distributed: DataParallel | None = None,
    ) -> None:
        """``config`` (the resolved run config) is stored in checkpoints, so a resume can
        check it continues the same experiment. ``param_groups`` replaces the default
        single group of trainable model parameters (fine-tuning: per-stage learning
        rates, frozen stages that unfreeze later). ``distributed``: this rank of a
        ``trainer.strategy=ddp`` group; each step trains on its slice of the batch and
        the engine averages per-task gradients over ranks."""
        if settings.precision not in PRECISIONS:
            raise ValueError(f"trainer.precision must be one of {', '.join(PRECISIONS)}, got {settings.precision!r}")
        self.model = model.to(device)
        self.distributed = distributed
        if distributed is not None:
            distributed.broadcast_module_(self.model)
            distributed.check_batches(len(taskset.train), settings.batch_size, settings.eval_batch_size)
        # channels_last (NHWC) is what cuDNN's fastest convolution kernels want; on a CPU,
        # and for models without convolutions, it only adds layout conversions.
        self.channels_last = settings.channels_last == "always" or (
            settings.channels_last == "auto" and device.type == "cuda" and len(taskset.input_shape) == 3
        )
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if settings.compile:
            self.model.compile()  # compiles forward(); encode/decode of the features space stay eager
        self.scaler = LossScaler() if settings.precision == "fp16" else None
        self.taskset = taskset.on_device(device)
        self.tasks = taskset.tasks
        self.balancer = balancer.to(device)
        self.surgery = surgery
        self.settings = settings
        self.device = device
        self.logger = logger or RunLogger(None)
        self.checkpoint_dir = checkpoint_dir
        self.callbacks = list(callbacks)
        self.name = name
        self.config = config or {}

        self.data_generator = torch.Generator().manual_seed(settings.seed)
        self.method_generator = torch.Generator(device=device).manual_seed(settings.seed + 1)
        self.balancer.setup(self.tasks, self.method_generator)
        self.surgery.setup(len(self.tasks), self.method_generator)
        if taskset.multi_input and surgery.space == "features":
            raise ValueError(
                f"surgery.space=features needs one representation shared by all tasks, but dataset={taskset.name} "
                "gives each task its own inputs: use surgery.space=params"
            )
        self.engine = GradientEngine(model, self.balancer, surgery, settings.jacobian, distributed)  # type: ignore[arg-type]

        groups: list[dict[str, Any]] = param_groups or [{"params": [p for p in model.parameters() if p.requires_grad]}]
        balancer_params = [p for p in self.balancer.parameters() if p.requires_grad]
        if balancer_params:
            group: dict[str, Any] = {"params": balancer_params, "weight_decay": 0.0}
            if getattr(self.balancer, "lr", None) is not None:
                group["lr"] = self.balancer.lr
            groups.append(group)
        self.optimizer = optimizer_factory(groups)
        # Fused optimizers can skip a step on the device: the guard then needs no host sync.
        self._skip_on_device = (
            self.scaler is None
            and getattr(self.optimizer, "_step_supports_amp_scaling", False)
            and all(group.get("fused") for group in self.optimizer.param_groups)
        )
        self._pending_finite: list[tuple[int, Tensor]] = []
        self._step_finite: Tensor | None = None
        self.steps_per_epoch = max(1, math.ceil(len(taskset.train) / settings.batch_size))
        self.total_steps = self.steps_per_epoch * settings.epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.state = FitState()

    def _lr_factor(self, step: int) -> float:
        warmup = self.settings.warmup_epochs * self.steps_per_epoch
        if step < warmup:
            return (step + 1) / warmup
        if self.settings.lr_schedule == "constant":
            return 1.0
        if self.settings.lr_schedule == "step":  # MTAN/LibMTL's StepLR, counted in epochs
            return self.settings.lr_step_gamma ** (step // self.steps_per_epoch // self.settings.lr_step_epochs)
        progress = (step - warmup) / max(1, self.total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    # ------------------------------------------------------------------- train
    def compute_losses(self, outputs: dict[str, Tensor], targets: dict[str, Tensor]) -> Tensor:
        return torch.stack([task.loss(outputs[task.name], targets[task.name]) for task in self.tasks])

    def _forward(self, inputs: Any) -> dict[str, Tensor]:
        """The training forward. Multi-input datasets (``inputs`` a dict task -> tensor)
        run each task's inputs through the model for that task only
        (:meth:`SharingModel.predict`); the engine's per-task gradients then come from
        the same loss vector as for one shared batch."""
        if isinstance(inputs, dict):
            return self.model.predict(inputs)
        if self.channels_last and inputs.dim() == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        return self.engine.forward(inputs)

    def train_step(self, batch: Batch) -> tuple[Tensor, Tensor, StepGradients, bool]:
        """One optimisation step; returns losses, weights, the engine's gradients and
        whether the step was applied (False when it was skipped as non-finite)."""
        share = None
        if self.distributed is not None:
            batch, share = self.distributed.shard(batch, len(self.tasks))
            share = share.to(self.device, non_blocking=True)
        inputs, targets = batch
        step = self.state.step
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.settings.precision):
            outputs = self._forward(inputs)
            losses = self.compute_losses(outputs, targets).float()
        if share is not None:
            losses = losses * share
        # Under ddp the balancer, the surgery and the logs read the combined batch's losses.
        observed = losses.detach() if self.distributed is None else self.distributed.mean(losses)
        weights = self.balancer.weights(observed)
        need_jacobian = any(cb.wants_jacobian(step) for cb in self.callbacks)
        loss_scale = self.scaler.scale if self.scaler is not None else None
        grads = self.engine.backward(losses, weights, need_jacobian=need_jacobian, loss_scale=loss_scale, observed=observed)
        self._step_finite = None
        if self._skip_on_device and not need_jacobian:
            applied = self._guard_on_device(step, observed)
        else:
            if self._skip_on_device:
                self.optimizer.found_inf = None  # this step's guard runs on the host
            applied = self._guard_nonfinite(step, observed)
        if applied:
            self.optimizer.step()
        self.scheduler.step()
        if applied:
            self.balancer.after_step(lambda: self._recompute_losses(inputs, targets, share))
            for cb in self.callbacks:
                cb.on_step(self, step, observed, weights.detach(), grads)
        self.state.step += 1
        return observed, weights.detach(), grads, applied

    def _grad_norm(self) -> Tensor:
        """The global gradient norm, clipped to ``trainer.grad_clip_norm`` when set."""
        params = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        if self.settings.grad_clip_norm is not None:
            return torch.nn.utils.clip_grad_norm_(params, self.settings.grad_clip_norm)
        return torch.nn.utils.get_total_norm([p.grad for p in params]) if params else torch.zeros((), device=self.device)

    def _guard_on_device(self, step: int, losses: Tensor) -> bool:
        """The non-finite guard without a host sync (fused optimizers): the optimizer's
        ``found_inf`` flag makes its kernels skip the update on the device, as GradScaler
        does; the host learns which steps were skipped at the next logging interval and
        applies ``trainer.on_nonfinite`` then (the skipped steps changed nothing)."""
        finite = torch.cat([torch.isfinite(losses.detach()), torch.isfinite(self._grad_norm()).reshape(1)])
        ok = finite.all()
        self.optimizer.found_inf = (~ok).float()
        self._step_finite = ok
        self._pending_finite.append((step, finite))
        return True

    def _resolve_nonfinite(self) -> None:
        """Account for the steps the device guard skipped since the last call (one sync)."""
        if not self._pending_finite:
            return
        steps = [step for step, _ in self._pending_finite]
        flags = torch.stack([finite for _, finite in self._pending_finite]).tolist()
        self._pending_finite.clear()
        for step, finite in zip(steps, flags):
            if all(finite):
                self.state.consecutive_nonfinite = 0
                continue
            self.state.epoch_batches -= 1
            self._record_nonfinite(step, finite[:-1])

    def _guard_nonfinite(self, step: int, losses: Tensor) -> bool:
        """Check losses and gradients for NaN/inf (one host sync per step, as a GradScaler
        does) and clip the gradient norm when configured. A non-finite step is skipped:
        gradients are dropped, the optimizer does not step, the counter grows."""
        total = self._grad_norm()
        losses_finite = bool(torch.isfinite(losses.detach()).all())
        finite = losses_finite and bool(torch.isfinite(total))
        if self.scaler is not None and losses_finite and self.scaler.update(finite):
            # An fp16 overflow of the scaled gradients: the scale backs off, the step is skipped.
            self.optimizer.zero_grad(set_to_none=True)
            self.state.overflow_steps += 1
            return False
        if finite:
            self.state.consecutive_nonfinite = 0
            return True
        self.optimizer.zero_grad(set_to_none=True)
        self._record_nonfinite(step, torch.isfinite(losses.detach()).tolist())
        return False

    def _record_nonfinite(self, step: int, losses_finite: list[bool]) -> None:
        """Count a skipped step; stop the run when ``trainer.on_nonfinite`` says so."""
        self.state.nonfinite_steps += 1
        self.state.consecutive_nonfinite += 1
        bad = [t.name for t, ok in zip(self.tasks, losses_finite) if not ok]
        where = f"loss of task {', '.join(bad)}" if bad else "gradients"
        message = f"step {step}: non-finite {where}"
        if self.settings.on_nonfinite == "stop" or self.state.consecutive_nonfinite >= self.settings.max_nonfinite_steps:
            raise NonFiniteError(f"{message} ({self.state.consecutive_nonfinite} consecutive; trainer.on_nonfinite={self.settings.on_nonfinite}, trainer.max_nonfinite_steps={self.settings.max_nonfinite_steps})")
        warnings.warn(f"{message}; step skipped ({self.state.nonfinite_steps} so far)", RuntimeWarning, stacklevel=3)

    @torch.no_grad()
    def _recompute_losses(self, inputs: Any, targets: dict[str, Tensor], share: Tensor | None) -> Tensor:
        losses = self.compute_losses(self.model.predict(inputs), targets)
        return losses if self.distributed is None or share is None else self.distributed.mean(losses * share)

    def fit(self) -> FitState:
        settings = self.settings
        names = [t.name for t in self.tasks]
        with Progress(settings.progress, self.name, settings.epochs, self.steps_per_epoch) as progress:
            progress.skip(self.state.step)
            for cb in self.callbacks:
                cb.on_fit_start(self)
            while self.state.epoch < settings.epochs:
                epoch = self.state.epoch
                started = time.perf_counter()
                state = self.state
                if state.batch_in_epoch == 0:
                    state.epoch_data_state = self.data_generator.get_state()
                    state.epoch_loss_sum = torch.zeros(len(self.tasks), device=self.device)
                    state.epoch_batches = 0
                else:  # resuming mid-epoch: replay this epoch's batch order
                    assert state.epoch_data_state is not None
                    self.data_generator.set_state(state.epoch_data_state)
                for index, batch in enumerate(
                    self.taskset.train.batches(settings.batch_size, shuffle=True, generator=self.data_generator, device=self.device)
                ):
                    if index < state.batch_in_epoch:
                        continue
                    step = state.step
                    losses, weights, grads, applied = self.train_step(batch)
                    state.batch_in_epoch = index + 1
                    if applied:
                        ok = self._step_finite
                        state.epoch_loss_sum += losses if ok is None else torch.where(ok, losses, 0.0)
                        state.epoch_batches += 1
                    self.logger.scalars([f"weight/{n}" for n in names], weights, step)
                    if grads.surgery_weights is not None:
                        self.logger.scalars([f"surgery_weight/{n}" for n in names], grads.surgery_weights, step)
                    for tag, value in self.balancer.extra_scalars().items():
                        self.logger.scalar(tag, value, step)
                    if step % settings.log_every_n_steps == 0:
                        self._resolve_nonfinite()
                        self.logger.scalars([f"loss/train/{n}" for n in names], losses, step)
                        self.logger.scalar("loss/train/total", (weights * losses).sum(), step)
                        self.logger.scalar("lr", self.scheduler.get_last_lr()[0], step)
                        self.logger.flush()
                    every = settings.checkpoint_every_n_steps
                    if every and state.step % every == 0:
                        self.save_checkpoint()
                    progress.advance()
                assert state.epoch_loss_sum is not None
                self._resolve_nonfinite()
                mean_losses = state.epoch_loss_sum / max(1, state.epoch_batches)
                self.balancer.epoch_end(mean_losses)
                val = self.evaluate(self.taskset.val)
                self._log_eval("val", val, state.last_step)
                state.epoch += 1
                state.batch_in_epoch = 0
                record = {
                    "epoch": self.state.epoch,
                    "train_loss": dict(zip(names, mean_losses.tolist())),
                    "val_loss": val.losses,
                    "val_metrics": val.metrics,
                    "seconds": time.perf_counter() - started,
                }
                self.state.history.append(record)
                for cb in self.callbacks:
                    cb.on_epoch_end(self, epoch)
                self.logger.flush()
                self.save_checkpoint()
                progress.epoch_done(record)
        for cb in self.callbacks:
            cb.on_fit_end(self)
        self.logger.flush()
        return self.state

    # --------------------------------------------------------------- evaluate
    @torch.no_grad()
    def evaluate(self, split: Split) -> EvalResult:
        self.model.eval()
        accumulators = {t.name: t.accumulator(self.device) for t in self.tasks}
        loss_sum = torch.zeros(len(self.tasks), device=self.device, dtype=torch.float64)
        count = 0
        for inputs, targets in split.batches(
            self.settings.eval_batch_size, shuffle=False, generator=None, device=self.device
        ):
            if self.distributed is not None:
                (inputs, targets), _ = self.distributed.shard((inputs, targets), len(self.tasks))
                if all(len(t) == 0 for t in targets.values()):
                    continue  # a last batch smaller than the number of ranks
            if self.channels_last and isinstance(inputs, Tensor) and inputs.dim() == 4:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            with autocast(self.device, self.settings.precision):
                outputs = {name: out.float() for name, out in self.model.predict(inputs).items()}
            # Per-task example counts: a multi-input batch holds a different number per task.
            n = torch.tensor([len(targets[t.name]) for t in self.tasks], dtype=torch.float64, device=self.device)
            loss_sum += torch.where(n > 0, self.compute_losses(outputs, targets).double() * n, 0.0)
            count = count + n
            for task in self.tasks:
                accumulators[task.name].update(outputs[task.name], targets[task.name])
        if self.distributed is not None:
            count = torch.zeros_like(loss_sum) + count
            self.distributed.sum_([loss_sum, count, *self.distributed.statistics(accumulators.values())])
        losses = (loss_sum / torch.as_tensor(count, dtype=torch.float64, device=self.device).clamp_min(1)).tolist()
        return EvalResult(
            losses={t.name: v for t, v in zip(self.tasks, losses)},
            metrics={name: acc.compute() for name, acc in accumulators.items()},
        )

    def _log_eval(self, split: str, result: EvalResult, step: int) -> None:
        for task, loss in result.losses.items():
            self.logger.scalar(f"loss/{split}/{task}", loss, step)
        for task, metrics in result.metrics.items():
            for metric, value in metrics.items():
                self.logger.scalar(f"metric/{split}/{task}/{metric}", value, step)

    def test(self) -> EvalResult:
        result = self.evaluate(self.taskset.test)
        self._log_eval("test", result, self.state.last_step)
        self.logger.flush()
        return result

    # ------------------------------------------------------------ checkpoints
    def checkpoint_state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "balancer": self.balancer.state_dict(),
            "surgery": self.surgery.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "config": self.config,
            "engine": self.engine.state_dict(),
            "state": asdict(self.state),
            "callbacks": [cb.state_dict() for cb in self.callbacks],
            "rng": {
                "torch": torch.get_rng_state(),
                "data": self.data_generator.get_state(),
                "method": self.method_generator.get_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
        }

    def save_checkpoint(self) -> None:
        """Atomically replace ``last.pt``; events up to here are flushed to disk first, so a
        resume from this checkpoint that purges later events loses nothing."""
        self._resolve_nonfinite()
        if self.checkpoint_dir is not None:
            self.logger.sync()
            io.torch_save(self.checkpoint_dir / LAST_NAME, self.checkpoint_state())

    def load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore everything ``checkpoint_state`` saved; training continues exactly where
        it stopped (same batches, same random draws)."""
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.balancer.load_state_dict(checkpoint["balancer"])
        self.surgery.load_state_dict(checkpoint["surgery"])
        if self.scaler is not None and checkpoint.get("scaler") is not None:
            self.scaler.load_state_dict(checkpoint["scaler"])
        self.engine.load_state_dict(checkpoint["engine"])
        self.state = FitState(**checkpoint["state"])
        for cb, cb_state in zip(self.callbacks, checkpoint["callbacks"]):
            cb.load_state_dict(cb_state)
        rng = checkpoint["rng"]
        torch.set_rng_state(rng["torch"])
        self.data_generator.set_state(rng["data"])
        self.method_generator.set_state(rng["method"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
