"""Validation and test kept apart: trainer.select, the val/test blocks of results.json."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mtl_runner import baselines, build
from mtl_runner.assemble import build_run
from mtl_runner.data.base import Split
from mtl_runner.runner import run_experiment
from mtl_runner.train.selection import BEST_NAME, normalised_loss_score
from mtl_runner.train.state import EvalResult
from tests.conftest import compose_config
from tests.test_baselines import VECTOR


class SealedSplit:
    """A split that raises when read before it is unsealed: the test data of a run whose
    model selection must not look at it."""

    def __init__(self, inner: Split) -> None:
        self.inner = inner
        self.sealed = True

    def __len__(self) -> int:
        return len(self.inner)

    def batches(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        if self.sealed:
            raise AssertionError("the test split was read during training")
        return self.inner.batches(*args, **kwargs)


@pytest.mark.slow
def test_best_val_restores_the_selected_epoch_without_reading_test_data(tmp_path: Path) -> None:
    cfg = compose_config([*VECTOR, "trainer.epochs=3", "trainer.select=best_val", "baseline=off"])
    taskset = build.build_taskset(cfg)
    sealed = SealedSplit(taskset.test)
    run = build_run(cfg, tmp_path, taskset=dataclasses.replace(taskset, test=sealed), diagnostics=False)
    assert run.selection is not None
    # A score that prefers the first epoch: the restored model must differ from the last one.
    run.selection.score = lambda result, history: -float(len(history))
    run.trainer.fit()
    history = run.trainer.state.history
    assert run.selection.best_epoch == 1 and (tmp_path / "checkpoints" / BEST_NAME).is_file()
    restored = run.trainer.evaluate(run.trainer.taskset.val)
    assert restored.metrics == history[0]["val_metrics"] != history[-1]["val_metrics"]
    sealed.sealed = False
    run.trainer.test()
    run.logger.close()


def test_normalised_loss_score_weighs_tasks_alike() -> None:
    first = EvalResult(losses={"a": 100.0, "b": 1.0}, metrics={})
    history = [{"val_loss": first.losses}]
    # a halved large loss and a halved small loss are the same gain
    assert normalised_loss_score(EvalResult(losses={"a": 50.0, "b": 1.0}, metrics={}), history) == pytest.approx(
        normalised_loss_score(EvalResult(losses={"a": 100.0, "b": 0.5}, metrics={}), history))
    assert normalised_loss_score(first, []) == pytest.approx(-1.0)


@pytest.mark.slow
def test_results_carry_val_and_test_blocks_with_their_own_delta_m(tmp_path: Path) -> None:
    cfg = compose_config([*VECTOR, "trainer.epochs=2", "trainer.select=best_val", f"baseline.root={tmp_path / 'cache'}"])
    out = run_experiment(cfg, tmp_path / "run")
    stored = json.loads((tmp_path / "run" / "results.json").read_text())
    assert stored["selection"]["rule"] == "best_val" and stored["selection"]["epoch"] in (1, 2)
    assert stored["test"]["delta_m_pct"] == pytest.approx(out["delta_m_pct"])
    records = {name: baselines.read_record(Path(entry["dir"])) for name, entry in stored["baselines"]["tasks"].items()}
    deltas = []
    for task, values in stored["val"]["metrics"].items():
        for metric, value in values.items():
            stl = records[task].val_metrics[metric]
            sign = 1 if stored["tasks"][task]["metrics"][metric]["higher_is_better"] else -1
            deltas.append(sign * (value - stl) / abs(stl) * 100)
            assert stored["val"]["delta_pct"][task][metric] == pytest.approx(deltas[-1])
    assert stored["val"]["delta_m_pct"] == pytest.approx(sum(deltas) / len(deltas))
    assert stored["val"]["delta_m_pct"] != pytest.approx(stored["test"]["delta_m_pct"])
    assert "Δm validation" in (tmp_path / "run" / "results.md").read_text()
