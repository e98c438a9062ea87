"""``trainer.select=best_val``: keep the epoch that validation prefers, not merely the last.

Selection reads nothing but the validation evaluations the trainer hands to callbacks
(``on_eval`` with ``split="val"``); the test split is evaluated only after ``fit`` returns,
so a selected model has never been chosen on test data. The score is handed in (higher is
better): Δm against the single-task baselines' validation metrics when the run has them
(:mod:`mtl_runner.runner`), else :func:`normalised_loss_score`.

The selected weights are kept in memory (a CPU copy) and, when the run has a checkpoint
directory, in ``checkpoints/best.pt``; at the end of ``fit`` they are put back into the
model, so what is tested and reported is the selected epoch's model. ``last.pt`` still
holds the last epoch, which is what a resume continues from.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from mtl_runner import io
from mtl_runner.train.state import EvalResult
from mtl_runner.train.trainer import Callback, Trainer

#: File name of the selected epoch's weights inside a run's checkpoint directory.
BEST_NAME = "best.pt"

#: A validation result and the epochs before it (``FitState.history``) -> a score, higher better.
Score = Callable[[EvalResult, Sequence[dict[str, Any]]], float]


def normalised_loss_score(result: EvalResult, history: Sequence[dict[str, Any]]) -> float:
    """Minus the mean over tasks of each validation loss divided by its value at the first
    epoch's validation: tasks whose losses differ in scale then count alike (a raw sum
    would let the largest loss choose the epoch). The first epoch comes from the history,
    so a resumed run scores on the same footing."""
    first = history[0]["val_loss"] if history else result.losses
    return -sum(result.losses[name] / (abs(first[name]) or 1.0) for name in result.losses) / len(result.losses)


class ModelSelection(Callback):
    """Tracks the best validation score over epochs and restores that epoch's weights."""

    def __init__(self, score: Score, directory: Path | None) -> None:
        self.score = score
        self.directory = Path(directory) if directory is not None else None
        self.best_score: float | None = None
        self.best_epoch: int | None = None
        self._best_state: dict[str, torch.Tensor] | None = None

    def on_eval(self, trainer: Trainer, split: str, result: EvalResult) -> None:
        if split != "val":
            return
        value = self.score(result, trainer.state.history)
        if self.best_score is not None and not value > self.best_score:
            return
        self.best_score, self.best_epoch = value, trainer.state.epoch + 1
        self._best_state = {k: v.detach().to("cpu", copy=True) for k, v in trainer.model.state_dict().items()}
        if self.directory is not None and trainer.is_main:
            io.torch_save(self.directory / BEST_NAME, {"model": self._best_state, "epoch": self.best_epoch, "score": value})

    def on_fit_end(self, trainer: Trainer) -> None:
        if self._best_state is None and self.directory is not None and (self.directory / BEST_NAME).is_file():
            self._best_state = torch.load(self.directory / BEST_NAME, map_location="cpu", weights_only=True)["model"]
        if self._best_state is not None:
            trainer.model.load_state_dict(self._best_state)

    def state_dict(self) -> dict[str, Any]:
        return {"best_score": self.best_score, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_score, self.best_epoch = state.get("best_score"), state.get("best_epoch")

    def summary(self) -> dict[str, Any]:
        """What ``results.json`` records under ``selection``."""
        return {"rule": "best_val", "epoch": self.best_epoch, "score": self.best_score}
