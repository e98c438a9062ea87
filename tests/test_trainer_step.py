"""The per-step shortcuts of the training loop keep what users rely on: the conflict
cosines, the non-finite weights check, and training mode on every step."""

from __future__ import annotations

import pytest
import torch
from rich.console import Console
from torch import nn

from mtl_runner.assemble import build_run
from mtl_runner.diagnostics import cosine_matrix
from mtl_runner.train.logger import RunLogger
from mtl_runner.train.nonfinite import NonFiniteError, NonFiniteGuard
from mtl_runner.train.state import FitState, StepOutcome
from mtl_runner.train.trainer import Callback, Trainer
from tests.conftest import TINY, compose_config


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cosines_from_the_gramian_equal_those_of_the_normalised_rows(dtype: torch.dtype) -> None:
    rows = torch.randn(5, 1000, generator=torch.Generator().manual_seed(0), dtype=dtype)
    rows[2] = 0.0  # a zero row has cosine 0 with everything, itself included
    rows[4] = -3.0 * rows[0]
    unit = rows.double() / rows.double().norm(dim=1, keepdim=True).clamp_min(1e-300)
    got = cosine_matrix(rows)
    assert torch.allclose(got, unit @ unit.T, rtol=0, atol=1e-12)
    assert (got[2] == 0).all() and (got[:, 2] == 0).all()
    assert got[0, 4] == pytest.approx(-1.0, abs=1e-12)


def _guard_after_update(weights: list[torch.Tensor]) -> tuple[NonFiniteGuard, FitState]:
    """A CPU guard whose optimizer has just set the weights to ``weights``."""
    params = [nn.Parameter(torch.zeros_like(w)) for w in weights]
    optimizer = torch.optim.SGD(params, lr=0.0)
    settings = compose_config(TINY).trainer
    guard = NonFiniteGuard((), optimizer, settings, None, torch.device("cpu"))
    with torch.no_grad():
        for p, w in zip(params, weights):
            p.copy_(w)
    optimizer.step()  # the post-step hook computes the weights flag
    return guard, FitState()


def test_huge_finite_weights_pass_the_weights_check() -> None:
    guard, state = _guard_after_update([torch.full((4,), 1e30), torch.full((3, 3), -1e30)])
    guard.settle_pending(state)


@pytest.mark.parametrize("bad", ["nan", "inf", "opposite infinities"])
def test_non_finite_weights_stop_the_run_on_a_cpu(bad: str) -> None:
    first, second = torch.zeros(4), torch.ones(3, 3)
    if bad == "nan":
        second[1, 1] = float("nan")
    elif bad == "inf":
        first[0] = float("inf")
    else:  # each tensor's sum is infinite, their total NaN: still flagged
        first[0], second[2, 2] = float("inf"), float("-inf")
    guard, state = _guard_after_update([first, second])
    with pytest.raises(NonFiniteError, match="weights are non-finite"):
        guard.settle_pending(state)


class _ModeRecorder(Callback):
    """Records whether every module trained in training mode, and after each epoch leaves
    a submodule alone in eval mode (as a stage that stops being frozen is left)."""

    def __init__(self) -> None:
        self.modes: list[bool] = []

    def on_train_batch_end(self, trainer: Trainer, outcome: StepOutcome) -> None:
        self.modes.append(all(m.training for m in trainer.model.modules()))

    def on_epoch_end(self, trainer: Trainer, epoch: int) -> None:
        trainer.model.train()
        next(iter(trainer.model.children())).eval()


def test_every_step_trains_in_training_mode_after_evaluations_and_submodule_switches() -> None:
    cfg = compose_config([*TINY, "trainer.epochs=2", "diagnostics=off"])
    recorder = _ModeRecorder()
    trainer = build_run(cfg, None, logger=RunLogger(None), callbacks=[recorder], console=Console(quiet=True)).trainer
    trainer.fit()
    assert len(recorder.modes) == 2 * trainer.steps_per_epoch and all(recorder.modes)
    trainer.evaluate(trainer.taskset.val)
    trainer.train_step(next(iter(trainer.taskset.train.batches(4, shuffle=False, generator=None, device=trainer.device))))
    assert trainer.model.training
