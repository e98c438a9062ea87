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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mtl_runner import io
from mtl_runner.data.base import Batch, Split, TaskSet
from mtl_runner.models.sharing.base import SharingModel
from mtl_runner.optim.balancers.base import Balancer
from mtl_runner.optim.jacobian import GradientEngine, StepGradients
from mtl_runner.optim.surgery.base import Surgery
from mtl_runner.train.logger import RunLogger
from mtl_runner.train.progress import Progress


class Callback:
    """Hooks into the loop. ``wants_jacobian(step)`` asks the engine for per-task
    gradients on that step (e.g. a diagnostics step)."""

    def wants_jacobian(self, step: int) -> bool:
        return False

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
    jacobian: str = "auto"
    log_every_n_steps: int = 10
    progress: str = "auto"


@dataclass
class EvalResult:
    losses: dict[str, float]
    metrics: dict[str, dict[str, float]]


@dataclass
class FitState:
    epoch: int = 0
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


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
    ) -> None:
        self.model = model.to(device)
        self.taskset = taskset
        self.tasks = taskset.tasks
        self.balancer = balancer.to(device)
        self.surgery = surgery
        self.settings = settings
        self.device = device
        self.logger = logger or RunLogger(None)
        self.checkpoint_dir = checkpoint_dir
        self.callbacks = list(callbacks)
        self.name = name

        self.data_generator = torch.Generator().manual_seed(settings.seed)
        self.method_generator = torch.Generator(device=device).manual_seed(settings.seed + 1)
        self.balancer.setup(self.tasks, self.method_generator)
        self.surgery.setup(len(self.tasks), self.method_generator)
        self.engine = GradientEngine(model, self.balancer, surgery, settings.jacobian)  # type: ignore[arg-type]

        groups: list[dict[str, Any]] = [{"params": [p for p in model.parameters() if p.requires_grad]}]
        balancer_params = [p for p in self.balancer.parameters() if p.requires_grad]
        if balancer_params:
            group: dict[str, Any] = {"params": balancer_params, "weight_decay": 0.0}
            if getattr(self.balancer, "lr", None) is not None:
                group["lr"] = self.balancer.lr
            groups.append(group)
        self.optimizer = optimizer_factory(groups)
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
        progress = (step - warmup) / max(1, self.total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    # ------------------------------------------------------------------- train
    def compute_losses(self, outputs: dict[str, Tensor], targets: dict[str, Tensor]) -> Tensor:
        return torch.stack([task.loss(outputs[task.name], targets[task.name]) for task in self.tasks])

    def _forward(self, inputs: Any) -> dict[str, Tensor]:
        return self.engine.forward(inputs)

    def train_step(self, batch: Batch) -> tuple[Tensor, Tensor, StepGradients]:
        inputs, targets = batch
        step = self.state.step
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        outputs = self._forward(inputs)
        losses = self.compute_losses(outputs, targets)
        weights = self.balancer.weights(losses)
        need_jacobian = any(cb.wants_jacobian(step) for cb in self.callbacks)
        grads = self.engine.backward(losses, weights, need_jacobian=need_jacobian)
        self.optimizer.step()
        self.scheduler.step()
        self.balancer.after_step(lambda: self._recompute_losses(inputs, targets))
        for cb in self.callbacks:
            cb.on_step(self, step, losses.detach(), weights.detach(), grads)
        self.state.step += 1
        return losses.detach(), weights.detach(), grads

    @torch.no_grad()
    def _recompute_losses(self, inputs: Any, targets: dict[str, Tensor]) -> Tensor:
        return self.compute_losses(self.model(inputs), targets)

    def fit(self) -> FitState:
        settings = self.settings
        names = [t.name for t in self.tasks]
        with Progress(settings.progress, self.name, settings.epochs, self.steps_per_epoch) as progress:
            while self.state.epoch < settings.epochs:
                epoch = self.state.epoch
                started = time.perf_counter()
                loss_sum = torch.zeros(len(self.tasks), device=self.device)
                batches = 0
                for batch in self.taskset.train.batches(
                    settings.batch_size, shuffle=True, generator=self.data_generator, device=self.device
                ):
                    step = self.state.step
                    losses, weights, grads = self.train_step(batch)
                    loss_sum += losses
                    batches += 1
                    self.logger.scalars([f"weight/{n}" for n in names], weights, step)
                    if grads.surgery_weights is not None:
                        self.logger.scalars([f"surgery_weight/{n}" for n in names], grads.surgery_weights, step)
                    for tag, value in self.balancer.extra_scalars().items():
                        self.logger.scalar(tag, value, step)
                    if step % settings.log_every_n_steps == 0:
                        self.logger.scalars([f"loss/train/{n}" for n in names], losses, step)
                        self.logger.scalar("loss/train/total", (weights * losses).sum(), step)
                        self.logger.scalar("lr", self.scheduler.get_last_lr()[0], step)
                        self.logger.flush()
                    progress.advance()
                mean_losses = loss_sum / max(1, batches)
                self.balancer.epoch_end(mean_losses)
                val = self.evaluate(self.taskset.val)
                self._log_eval("val", val, self.state.step)
                self.state.epoch += 1
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
            outputs = self.model(inputs)
            n = len(next(iter(targets.values())))
            loss_sum += self.compute_losses(outputs, targets).double() * n
            count += n
            for task in self.tasks:
                accumulators[task.name].update(outputs[task.name], targets[task.name])
        losses = (loss_sum / max(1, count)).tolist()
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
        self._log_eval("test", result, self.state.step)
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
            "engine_strategy": self.engine.strategy,
            "epoch": self.state.epoch,
            "step": self.state.step,
            "history": self.state.history,
            "rng": {
                "torch": torch.get_rng_state(),
                "data": self.data_generator.get_state(),
                "method": self.method_generator.get_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
        }

    def save_checkpoint(self) -> None:
        if self.checkpoint_dir is not None:
            io.torch_save(self.checkpoint_dir / "last.pt", self.checkpoint_state())
