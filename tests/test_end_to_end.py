"""mtl-run end to end: results.json, TensorBoard events, reproducibility, multirun layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mtl_runner.runner import run_experiment
from tests.conftest import TINY, compose_config, run_cli


def _scalar_tags(tb_dir: Path) -> set[str]:
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return set(acc.Tags()["scalars"])


@pytest.mark.slow
def test_cli_run_writes_results_and_tensorboard(tmp_path: Path) -> None:
    result = run_cli([*TINY, "trainer.epochs=2"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    runs = list((tmp_path / "outputs" / "runs").iterdir())
    assert len(runs) == 1
    run_dir = runs[0]
    for name in (".hydra/config.yaml", "results.json", "results.md", "checkpoints/last.pt"):
        assert (run_dir / name).exists(), name

    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "completed"
    assert results["epochs"] == 2
    assert set(results["tasks"]) == {"seg", "depth", "count"}
    miou = results["tasks"]["seg"]["metrics"]["miou"]
    assert miou["higher_is_better"] is True and 0.0 <= miou["mtl"] <= 1.0
    assert results["tasks"]["depth"]["metrics"]["abs_err"]["higher_is_better"] is False
    assert results["parameters"]["mtl"] > 0
    assert results["config"]["trainer"]["epochs"] == 2

    tags = _scalar_tags(run_dir)
    for task in ("seg", "depth", "count"):
        assert f"loss/train/{task}" in tags
        assert f"loss/val/{task}" in tags
        assert f"weight/{task}" in tags
    assert "metric/val/seg/miou" in tags and "metric/test/depth/abs_err" in tags
    assert "lr" in tags
    assert "test metrics" in result.stdout


@pytest.mark.slow
def test_same_seed_same_metrics(tmp_path: Path) -> None:
    cfg = compose_config(TINY)
    first = run_experiment(cfg, tmp_path / "a")
    second = run_experiment(cfg, tmp_path / "b")
    assert first["tasks"] == second["tasks"]
    other = run_experiment(compose_config([*TINY, "trainer.seed=1"]), tmp_path / "c")
    assert other["tasks"] != first["tasks"]


@pytest.mark.slow
def test_multirun_lands_in_named_job_dirs(tmp_path: Path) -> None:
    result = run_cli(["-m", *TINY, "optimizer.lr=0.001,0.0003"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    sweeps = list((tmp_path / "outputs" / "multirun").iterdir())
    assert len(sweeps) == 1
    jobs = sorted(p.name for p in sweeps[0].iterdir() if p.is_dir())
    assert jobs == ["optimizer.lr=0.0003", "optimizer.lr=0.001"]
    for job in jobs:
        results = json.loads((sweeps[0] / job / "results.json").read_text())
        assert results["run_name"] == job
