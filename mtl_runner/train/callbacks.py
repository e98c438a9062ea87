"""The two callbacks every ``mtl-run`` trainer carries, beside diagnostics and fine-tuning.

:class:`TrainingLog` writes the training curves and evaluation results;
:class:`Checkpointing` writes ``last.pt``. They are :class:`~mtl_runner.train.trainer.Callback`
objects like any other, so the loop itself neither logs nor saves.
The run builder (:mod:`mtl_runner.assemble`) puts them after the other callbacks: an
epoch's scalars, whoever logged them, are flushed before its checkpoint is written, so a
resume that purges later events loses none of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mtl_runner import io
from mtl_runner.checkpoints import LAST_NAME
from mtl_runner.train.state import EvalResult, StepOutcome
from mtl_runner.train.trainer import Callback, Trainer


class TrainingLog(Callback):
    """The curves of training: task and surgery weights and the balancer's own scalars
    every step; train losses, their weighted total and the learning rate every
    ``trainer.log_every_n_steps`` steps; validation and test losses and metrics.
    Scalars stay on the device until a flush (the logging interval, an evaluation, an
    epoch's end), so a step costs no host synchronisation."""

    def on_train_batch_end(self, trainer: Trainer, outcome: StepOutcome) -> None:
        log, step, names = trainer.logger, outcome.step, [t.name for t in trainer.tasks]
        log.scalars([f"weight/{n}" for n in names], outcome.weights, step)
        if outcome.grads.surgery_weights is not None:
            log.scalars([f"surgery_weight/{n}" for n in names], outcome.grads.surgery_weights, step)
        for tag, value in trainer.balancer.extra_scalars().items():
            log.scalar(tag, value, step)
        if step % trainer.settings.log_every_n_steps == 0:
            log.scalars([f"loss/train/{n}" for n in names], outcome.losses, step)
            log.scalar("loss/train/total", (outcome.weights * outcome.losses).sum(), step)
            log.scalar("lr", trainer.scheduler.get_last_lr()[0], step)
            log.flush()

    def on_eval(self, trainer: Trainer, split: str, result: EvalResult) -> None:
        step = trainer.state.last_step
        for task, loss in result.losses.items():
            trainer.logger.scalar(f"loss/{split}/{task}", loss, step)
        for task, metrics in result.metrics.items():
            for metric, value in metrics.items():
                trainer.logger.scalar(f"metric/{split}/{task}/{metric}", value, step)
        trainer.logger.flush()

    def on_epoch_end(self, trainer: Trainer, epoch: int) -> None:
        trainer.logger.flush()

    def on_fit_end(self, trainer: Trainer) -> None:
        trainer.logger.flush()


class Checkpointing(Callback):
    """``<directory>/last.pt``, atomically replaced at every epoch's end and, with
    ``every_n_steps > 0``, every that many steps. ``config`` (the resolved run config)
    goes into each checkpoint so that a resume can check it continues the same
    experiment. Every rank of a ddp group settles its state at the same steps (the
    non-finite guard's verdicts among it); rank 0 alone writes."""

    def __init__(self, directory: Path, every_n_steps: int, config: dict[str, Any]) -> None:
        self.directory = Path(directory)
        self.every_n_steps = every_n_steps
        self.config = config

    def on_train_batch_end(self, trainer: Trainer, outcome: StepOutcome) -> None:
        if self.every_n_steps and trainer.state.step % self.every_n_steps == 0:
            self.save(trainer)

    def on_epoch_end(self, trainer: Trainer, epoch: int) -> None:
        self.save(trainer)

    def save(self, trainer: Trainer) -> None:
        """Events up to here reach the disk first, so a resume from this checkpoint that
        purges later events loses nothing."""
        state = trainer.checkpoint_state()
        if trainer.is_main:
            trainer.logger.sync()
            io.torch_save(self.directory / LAST_NAME, {**state, "config": self.config})
