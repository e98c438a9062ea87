"""Scale-out: parallel sweeps through the joblib launcher, an Optuna search, and DDP that
trains what one process trains on the combined batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from mtl_runner import build
from mtl_runner.assemble import build_run
from mtl_runner.config import ConfigError
from mtl_runner.results import split_lines
from mtl_runner.sweep import objective_value
from mtl_runner.train import distributed
from tests.conftest import TINY, compose_config, run_cli

#: A tiny vector problem without batch norm (BN statistics are per rank without
#: SyncBatchNorm, which has no CPU kernel). 64 examples in batches of 15: every batch
#: splits 8/7 over two ranks, and the last (4 examples) 2/2, so the per-rank loss shares matter.
DDP_CONFIG = [
    "dataset=controlled", "dataset.d=16", "dataset.k=4", "dataset.num_train=64", "dataset.num_val=16",
    "dataset.num_test=30", "backbone=mlp", "backbone.hidden=[32,32]", "trainer.epochs=2",
    "trainer.batch_size=15", "trainer.eval_batch_size=7", "trainer.progress=off", "trainer.jacobian=sequential",
    "diagnostics=off", "baseline=off",
]


def _train(overrides: list[str], group: distributed.DataParallel | None) -> tuple[dict[str, torch.Tensor], dict]:
    run = build_run(compose_config(overrides), None, group=group)
    run.trainer.fit()
    test = run.trainer.test()
    return {k: v.detach().clone() for k, v in run.model.state_dict().items()}, {"losses": test.losses, "metrics": test.metrics}


def _ddp_worker(rank: int, world_size: int, port: int, overrides: list[str], out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    group = distributed.init_process_group("cpu")
    try:
        params, test = _train([*overrides, "trainer.strategy=ddp"], group)
        torch.save({"params": params, "test": test}, f"{out}.{rank}")
    finally:
        # Both ranks done before either closes its connections: a rank that tears gloo down
        # while the other still reads from it aborts that one ("terminate called without an
        # active exception", about one run in ten without the barrier).
        dist.barrier()
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("choices", [
    ["balancer=uniform", "surgery=none"],
    ["balancer=uniform", "surgery=pcgrad"],
    ["balancer=uniform", "surgery=pcgrad", "surgery.task_subset=2"],  # every rank draws the same subsets
], ids=["uniform", "pcgrad", "pcgrad_task_subset"])
@pytest.mark.slow
def test_ddp_matches_single_process_on_the_combined_batch(tmp_path: Path, choices: list[str]) -> None:
    torch.set_num_threads(1)
    overrides = [*DDP_CONFIG, *choices]
    out = str(tmp_path / "ddp")
    mp.spawn(_ddp_worker, args=(2, _free_port(), overrides, out), nprocs=2, join=True)
    expected_params, expected_test = _train(overrides, None)
    ranks = [torch.load(f"{out}.{r}", weights_only=False) for r in range(2)]
    for result in ranks:
        for name, value in expected_params.items():
            torch.testing.assert_close(result["params"][name], value, atol=1e-5, rtol=1e-4, msg=name)
        for task, loss in expected_test["losses"].items():
            assert result["test"]["losses"][task] == pytest.approx(loss, rel=1e-4, abs=1e-6)
        assert result["test"]["metrics"].keys() == expected_test["metrics"].keys()
        for task, metrics in expected_test["metrics"].items():
            for metric, value in metrics.items():
                assert result["test"]["metrics"][task][metric] == pytest.approx(value, rel=1e-4, abs=1e-6)
    # Training changed the model: matching parameters are not the untouched initialisation.
    initial = compose_config(overrides)
    torch.manual_seed(initial.trainer.seed)
    untouched = build.build_model(initial, build.build_taskset(initial)).state_dict()
    assert any(not torch.allclose(untouched[k], v) for k, v in expected_params.items())


@pytest.mark.slow
def test_ddp_outside_torchrun_is_a_one_line_error(tmp_path: Path) -> None:
    result = run_cli([*TINY, "trainer.strategy=ddp"], cwd=tmp_path)
    assert result.returncode == 2
    assert "trainer.strategy=ddp runs under torchrun" in result.stderr
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_mtl_run_under_torchrun_finishes_with_every_rank_exiting_cleanly(tmp_path: Path) -> None:
    """Two ranks of a real `torchrun ... -m mtl_runner`: the run completes, both ranks
    exit 0 (they leave the process group together), and only rank 0 writes the record."""
    run_dir = tmp_path / "ddp run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
               "-m", "mtl_runner", *DDP_CONFIG, "trainer.strategy=ddp", "trainer.device=cpu", "trainer.num_threads=1",
               f"hydra.run.dir={run_dir}"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "terminate called" not in result.stderr
    assert json.loads((run_dir / "results.json").read_text())["status"] == "completed"


@pytest.mark.slow
def test_joblib_sweep_runs_jobs_concurrently(tmp_path: Path) -> None:
    result = run_cli(
        ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=4", *TINY, "trainer.epochs=3", "baseline=off",
         "diagnostics=off", "optimizer.lr=0.001,0.002,0.003,0.004"],
        cwd=tmp_path, timeout=400,
    )
    assert result.returncode == 0, result.stderr
    jobs = sorted(p for p in next((tmp_path / "outputs" / "multirun").iterdir()).iterdir() if p.is_dir())
    assert len(jobs) == 4
    spans = []
    for job in jobs:
        results = json.loads((job / "results.json").read_text())
        assert results["status"] == "completed"
        # Each job took its share of the cores instead of all of them.
        assert results["config"]["trainer"]["num_threads"] == max(1, (os.cpu_count() or 1) // 4)
        spans.append(((job / ".hydra" / "config.yaml").stat().st_mtime, (job / "results.json").stat().st_mtime))
    overlapping = [(a, b) for i, a in enumerate(spans) for b in spans[i + 1:] if a[0] < b[1] and b[0] < a[1]]
    assert overlapping, f"no two jobs ran at the same time: {spans}"


@pytest.mark.slow
def test_optuna_search_records_the_best_trial(tmp_path: Path) -> None:
    result = run_cli(
        ["-m", "hparams_search=cagrad_optuna", "hydra.sweeper.n_trials=3", "hydra.sweeper.direction=minimize",
         "objective=val.losses.depth", *TINY, "baseline=off", "diagnostics=off"],
        cwd=tmp_path, timeout=400,
    )
    assert result.returncode == 0, result.stderr
    sweep = next((tmp_path / "outputs" / "multirun").iterdir())
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) == {"surgery.c", "optimizer.lr"}
    values = []
    for job in (p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")):
        results = json.loads((job / "results.json").read_text())
        assert results["config"]["surgery"]["_target_"].endswith("CAGrad")
        values.append(results["val"]["losses"]["depth"])
    assert len(values) == 3
    assert best["best_value"] == pytest.approx(min(values))


def test_objective_names_what_results_offer() -> None:
    results = {"delta_m_pct": 1.5, "tasks": {"seg": {"metrics": {"miou": {"mtl": 0.4, "delta_pct": None}}}}, "test_losses": {"seg": 0.7},
               "val": {"metrics": {"seg": {"miou": 0.5}}, "losses": {"seg": 0.6}, "delta_m_pct": 2.5}}
    assert objective_value(results, "val.delta_m_pct") == 2.5
    assert objective_value(results, "val.metrics.seg.miou") == pytest.approx(0.5)
    assert objective_value(results, "delta_m_pct") == 1.5
    assert objective_value(results, None) is None
    with pytest.raises(ConfigError, match="available: val.delta_m_pct, val.metrics.seg.miou, val.losses.seg, delta_m_pct, tasks.seg.metrics.miou.mtl, test_losses.seg"):
        objective_value(results, "tasks.depth.metrics.abs_err.mtl")
    with pytest.raises(ConfigError, match="objective"):
        compose_and_validate(["objective=tasks.seg.miou"])


def test_tuning_on_the_test_set_needs_the_flag_and_says_so() -> None:
    with pytest.raises(ConfigError, match="objective=delta_m_pct reads the test set.*objective_on_test=true"):
        compose_and_validate(["objective=delta_m_pct"])
    compose_and_validate(["objective=delta_m_pct", "objective_on_test=true"])
    compose_and_validate(["hparams_search=optuna"])  # the search's default objective is validation Δm
    lines = split_lines({"selection": {"rule": "last", "epoch": 2}, "val": {}, "test": {},
                         "config": {"objective": "delta_m_pct", "objective_on_test": True}})
    assert any(line.startswith("TUNED ON THE TEST SET") for line in lines)


def compose_and_validate(overrides: list[str]) -> None:
    from mtl_runner.config import validate

    validate(compose_config([*TINY, *overrides]))
