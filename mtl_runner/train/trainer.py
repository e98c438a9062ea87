"""The training loop: one place for every dataset, sharing strategy, balancer and surgery.

Per step: forward, the task-loss vector, the balancer's weights, the engine's backward
(fast path or per-task gradients), the non-finite guard's verdict, the optimizer step.
Losses and metrics accumulate on the device; the host reads them only at logging
intervals and epoch ends.

Everything else joins as a :class:`Callback`: the curves
(:class:`~mtl_runner.train.callbacks.TrainingLog`), the checkpoints
(:class:`~mtl_runner.train.callbacks.Checkpointing`), diagnostics, fine-tuning. The
settings are the run config's own ``trainer`` node (:class:`~mtl_runner.config.TrainerConfig`);
:func:`mtl_runner.assemble.build_run` wires a trainer from a config.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from functools import partial
from typing import Any

import torch
from torch import Tensor

from mtl_runner.config import TrainerConfig
from mtl_runner.data.base import Batch, Split, TaskSet
from mtl_runner.models.sharing.base import SharingModel
from mtl_runner.optim.balancers.base import Balancer
from mtl_runner.optim.jacobian import GradientEngine, StepGradients
from mtl_runner.optim.surgery.base import Surgery
from mtl_runner.train.distributed import DataParallel
from mtl_runner.train.logger import RunLogger
from mtl_runner.train.nonfinite import NonFiniteGuard
from mtl_runner.train.precision import LossScaler, autocast
from mtl_runner.train.progress import Progress
from mtl_runner.train.schedule import lr_factor
from mtl_runner.train.state import EvalResult, FitState, StepOutcome


class Callback:
    """Hooks into the loop. ``wants_jacobian(step)`` asks the engine for per-task
    gradients on that step (e.g. a diagnostics step). State a callback accumulates
    across steps goes into checkpoints through ``state_dict``/``load_state_dict``. Training
    mode is set at each epoch's start and when a step finds the root module in eval mode."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state

    def wants_jacobian(self, step: int) -> bool:
        return False

    def on_fit_start(self, trainer: Trainer) -> None:
        """Before the first step of ``fit`` (after a resume has restored the state)."""

    def on_step(self, trainer: Trainer, step: int, losses: Tensor, weights: Tensor, grads: StepGradients) -> None:
        """After a step whose update was applied (a skipped non-finite step is not seen)."""

    def on_train_batch_end(self, trainer: Trainer, outcome: StepOutcome) -> None:
        """After every training step of ``fit``, applied or skipped."""

    def on_eval(self, trainer: Trainer, split: str, result: EvalResult) -> None:
        """After the validation of each epoch (``split="val"``) and after ``test()``."""

    def on_epoch_end(self, trainer: Trainer, epoch: int) -> None:
        pass

    def on_fit_end(self, trainer: Trainer) -> None:
        pass


class Trainer:
    def __init__(
        self,
        model: SharingModel,
        taskset: TaskSet,
        balancer: Balancer,
        surgery: Surgery,
        optimizer_factory: Callable[[list[dict[str, Any]]], torch.optim.Optimizer],
        settings: TrainerConfig,
        device: torch.device,
        logger: RunLogger | None = None,
        callbacks: Sequence[Callback] = (),
        name: str = "mtl",
        param_groups: list[dict[str, Any]] | None = None,
        distributed: DataParallel | None = None,
    ) -> None:
        """``logger``: where callbacks write (none: nowhere). ``param_groups`` replaces the
        default single group of trainable model parameters (fine-tuning: per-stage
        learning rates, frozen stages that unfreeze later). ``distributed``: this rank of
        a ``trainer.strategy=ddp`` group; each step trains on its slice of the batch and
        the engine averages per-task gradients over ranks."""
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
        self.callbacks = list(callbacks)
        self.name = name

        self.data_generator = torch.Generator().manual_seed(settings.seed)
        self.method_generator = torch.Generator(device=device).manual_seed(settings.seed + 1)
        self.balancer.setup(self.tasks, self.method_generator)
        self.surgery.setup(len(self.tasks), self.method_generator)
        self.engine = GradientEngine(model, self.balancer, surgery, settings.jacobian, distributed)  # type: ignore[arg-type]

        groups: list[dict[str, Any]] = param_groups or [{"params": [p for p in model.parameters() if p.requires_grad]}]
        balancer_params = [p for p in self.balancer.parameters() if p.requires_grad]
        if balancer_params:
            group: dict[str, Any] = {"params": balancer_params, "weight_decay": 0.0}
            if getattr(self.balancer, "lr", None) is not None:
                group["lr"] = self.balancer.lr
            groups.append(group)
        self.optimizer = optimizer_factory(groups)
        self.guard = NonFiniteGuard(self.tasks, self.optimizer, settings, self.scaler, device)
        full_epoch = max(1, math.ceil(len(taskset.train) / settings.batch_size))
        self.steps_per_epoch = min(full_epoch, settings.max_batches_per_epoch or full_epoch)  # also the schedule's epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, partial(lr_factor, settings, self.steps_per_epoch))
        self.state = FitState()

    @property
    def is_main(self) -> bool:
        """Whether this process writes the run's files (rank 0 of a ddp group)."""
        return self.distributed is None or self.distributed.is_main

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

    def train_step(self, batch: Batch) -> StepOutcome:
        """One optimisation step; callbacks see it through ``on_step`` when it was applied."""
        share = None
        if self.distributed is not None:
            batch, share = self.distributed.shard(batch, len(self.tasks))
            share = share.to(self.device, non_blocking=True)
        inputs, targets = batch
        step = self.state.step
        if not self.model.training:  # after an evaluation; fit also sets it at each epoch's start
            self.model.train()
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
        # After the forward: the freed blocks go to this backward's gradients (docs/own-data.md#throughput)
        self.optimizer.zero_grad(set_to_none=True)
        grads = self.engine.backward(losses, weights, need_jacobian=need_jacobian, loss_scale=loss_scale, observed=observed)
        # A Jacobian step's callbacks read the result now: its verdict cannot wait on the device.
        verdict = self.guard.check(self.state, step, observed, on_host=need_jacobian)
        if verdict.applied:
            self.optimizer.step()
        self.scheduler.step()
        if verdict.applied:
            self.balancer.after_step(lambda: self._recompute_losses(inputs, targets, share))
            for cb in self.callbacks:
                cb.on_step(self, step, observed, weights.detach(), grads)
        self.state.step += 1
        return StepOutcome(step, observed, weights.detach(), grads, verdict.applied, verdict.finite)

    @torch.no_grad()
    def _recompute_losses(self, inputs: Any, targets: dict[str, Tensor], share: Tensor | None) -> Tensor:
        losses = self.compute_losses(self.model.predict(inputs), targets)
        return losses if self.distributed is None or share is None else self.distributed.mean(losses * share)

    def fit(self) -> FitState:
        settings = self.settings
        with Progress(settings.progress, self.name, settings.epochs, self.steps_per_epoch) as progress:
            progress.skip(self.state.step)
            for cb in self.callbacks:
                cb.on_fit_start(self)
            while self.state.epoch < settings.epochs:
                started = time.perf_counter()
                self.model.train()
                for batch in self._remaining_batches():
                    self._train_batch(batch)
                    progress.advance()
                progress.epoch_done(self._end_epoch(started))
        for cb in self.callbacks:
            cb.on_fit_end(self)
        return self.state

    def _remaining_batches(self) -> Iterator[Batch]:
        """This epoch's ``steps_per_epoch`` batches not trained on yet (after a mid-epoch resume: the rest, replayed)."""
        state = self.state
        if state.batch_in_epoch == 0:
            state.epoch_data_state = self.data_generator.get_state()
            state.epoch_loss_sum = torch.zeros(len(self.tasks), device=self.device)
            state.epoch_batches = 0
        else:
            assert state.epoch_data_state is not None
            self.data_generator.set_state(state.epoch_data_state)
        batches = self.taskset.train.batches(self.settings.batch_size, shuffle=True, generator=self.data_generator, device=self.device)
        return itertools.islice(batches, state.batch_in_epoch, self.steps_per_epoch)

    def _train_batch(self, batch: Batch) -> None:
        outcome = self.train_step(batch)
        state = self.state
        state.batch_in_epoch += 1
        if outcome.applied:
            assert state.epoch_loss_sum is not None
            kept = outcome.losses if outcome.finite is None else torch.where(outcome.finite, outcome.losses, 0.0)
            state.epoch_loss_sum += kept
            state.epoch_batches += 1
        if outcome.step % self.settings.log_every_n_steps == 0:
            self.guard.settle_pending(state)
        for cb in self.callbacks:
            cb.on_train_batch_end(self, outcome)

    def _end_epoch(self, started: float) -> dict[str, Any]:
        """Balancer and validation at the epoch's end; returns the epoch's history record."""
        state = self.state
        self.guard.settle_pending(state)
        assert state.epoch_loss_sum is not None
        mean_losses = state.epoch_loss_sum / max(1, state.epoch_batches)
        self.balancer.epoch_end(mean_losses)
        val = self.evaluate(self.taskset.val)
        for cb in self.callbacks:
            cb.on_eval(self, "val", val)
        epoch = state.epoch
        state.epoch += 1
        state.batch_in_epoch = 0
        record = {
            "epoch": state.epoch,
            "train_loss": dict(zip([t.name for t in self.tasks], mean_losses.tolist())),
            "val_loss": val.losses,
            "val_metrics": val.metrics,
            "seconds": time.perf_counter() - started,
        }
        state.history.append(record)
        for cb in self.callbacks:
            cb.on_epoch_end(self, epoch)
        return record

    # --------------------------------------------------------------- evaluate
    @torch.no_grad()
    def evaluate(self, split: Split) -> EvalResult:
        self.model.eval()
        accumulators = {t.name: t.accumulator(self.device) for t in self.tasks}
        loss_sum = torch.zeros(len(self.tasks), device=self.device, dtype=torch.float64)
        count = 0
        for inputs, targets in split.batches(self.settings.eval_batch_size, shuffle=False, generator=None, device=self.device):
            if self.distributed is not None:
                (inputs, targets), _ = self.distributed.shard((inputs, targets), len(self.tasks))
                if all(len(t) == 0 for t in targets.values()):
                    continue  # a last batch smaller than the number of ranks
            if self.channels_last and isinstance(inputs, Tensor) and inputs.dim() == 4:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            with autocast(self.device, self.settings.precision):
                outputs = {name: out.float() for name, out in self.model.predict(inputs).items()}
            # The exact mean over the split's labelled entries: sums and counts of entries, not
            # batch means (batches differ in how many labels they hold).
            terms = [task.loss_terms(outputs[task.name], targets[task.name]) for task in self.tasks]
            loss_sum += torch.stack([total for total, _ in terms]).double()
            count = count + torch.stack([labelled for _, labelled in terms]).double()
            for task in self.tasks:
                accumulators[task.name].update(outputs[task.name], targets[task.name])
        if self.distributed is not None:
            count = torch.zeros_like(loss_sum) + count
            self.distributed.sum_([loss_sum, count, *self.distributed.statistics(accumulators.values())])
        losses = (loss_sum / torch.as_tensor(count, dtype=torch.float64, device=self.device).clamp_min(1)).tolist()
        return EvalResult(losses={t.name: v for t, v in zip(self.tasks, losses)},
                          metrics={name: acc.compute() for name, acc in accumulators.items()})

    def test(self) -> EvalResult:
        result = self.evaluate(self.taskset.test)
        for cb in self.callbacks:
            cb.on_eval(self, "test", result)
        return result

    # ------------------------------------------------------------ checkpoints
    def checkpoint_state(self) -> dict[str, Any]:
        """Everything a resume needs; the device guard's pending verdicts are settled
        first, so the counters are final for the steps taken."""
        self.guard.settle_pending(self.state)
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "balancer": self.balancer.state_dict(),
            "surgery": self.surgery.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
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
