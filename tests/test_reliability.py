"""Reliability: kill and resume, atomic checkpoints, non-finite guards, failing sweep jobs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mtl_runner.runner import run_experiment
from mtl_runner.train.nonfinite import NonFiniteError
from mtl_runner.train.trainer import Trainer
from tests.conftest import TINY, compose_config, run_cli

RESUMABLE = [*TINY, "trainer.epochs=4", "trainer.checkpoint_every_n_steps=1", "diagnostics.every_n_steps=3"]
KILL_TIMEOUT_S = 120


def _steps(tb_dir: Path, tag: str) -> list[int]:
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return [event.step for event in acc.Scalars(tag)]


def _checkpoint_step(path: Path) -> int:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)["state"]["step"]
    except Exception:
        return -1


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    done = run_cli([*RESUMABLE, f"hydra.run.dir={reference}"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr

    killed = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-m", "mtl_runner", *RESUMABLE, f"hydra.run.dir={killed}"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + KILL_TIMEOUT_S
    while time.monotonic() < deadline and _checkpoint_step(killed / "checkpoints" / "last.pt") < 6:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert not (killed / "results.json").exists(), "the run finished before it could be killed"

    resumed = run_cli([*RESUMABLE, f"resume={killed}"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    want = json.loads((reference / "results.json").read_text())
    got = json.loads((killed / "results.json").read_text())
    assert got["resumed"] is True and got["status"] == "completed"
    assert got["tasks"] == want["tasks"]
    for tag in ("loss/train/seg", "weight/depth", "metric/val/seg/miou", "cos/seg~depth"):
        assert _steps(killed, tag) == _steps(reference, tag), tag


@pytest.mark.slow
def test_resume_refuses_a_different_experiment(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert run_cli([*TINY, f"hydra.run.dir={run}"], cwd=tmp_path).returncode == 0
    result = run_cli([*TINY, "trainer.seed=3", f"resume={run}"], cwd=tmp_path)
    assert result.returncode == 2
    assert "trainer.seed differs" in result.stderr
    missing = run_cli([*TINY, f"resume={tmp_path / 'nope'}"], cwd=tmp_path)
    assert missing.returncode == 2 and "no checkpoint at" in missing.stderr


@pytest.mark.slow
def test_sigkill_during_checkpoint_write_leaves_a_loadable_checkpoint(tmp_path: Path) -> None:
    target = tmp_path / "last.pt"
    writer = textwrap.dedent(
        f"""
        import torch
        from mtl_runner import io
        i = 0
        while True:
            io.torch_save({str(target)!r}, {{"i": i, "w": torch.full((2_000_000,), float(i))}})
            i += 1
        """
    )
    process = subprocess.Popen([sys.executable, "-c", writer], cwd=Path(__file__).parent.parent)
    deadline = time.monotonic() + KILL_TIMEOUT_S
    while time.monotonic() < deadline and not target.exists():
        time.sleep(0.05)
    time.sleep(0.5)  # well inside a later write
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    state = torch.load(target, weights_only=False)
    assert torch.equal(state["w"], torch.full((2_000_000,), float(state["i"])))


@pytest.mark.parametrize("fused", [False, True], ids=["host-guard", "device-guard"])
@pytest.mark.slow
def test_nan_loss_is_skipped_and_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fused: bool) -> None:
    # fused=true: the optimizer skips the step on the device and the host accounts for it
    # at the next logging interval (the sync-free path used on CUDA).
    config = [*TINY, f"optimizer.fused={str(fused).lower()}"]
    original = Trainer.compute_losses
    calls = {"train": 0}

    def poisoned(self: Trainer, outputs: dict, targets: dict) -> torch.Tensor:
        losses = original(self, outputs, targets)
        if self.model.training:
            calls["train"] += 1
            if calls["train"] == 2:
                return losses * torch.tensor([1.0, float("nan"), 1.0])
        return losses

    monkeypatch.setattr(Trainer, "compute_losses", poisoned)
    with pytest.warns(RuntimeWarning, match="step 1: non-finite loss of task depth"):
        results = run_experiment(compose_config(config), tmp_path)
    assert results["nonfinite_steps"] == 1
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert all(torch.isfinite(torch.tensor(list(h["train_loss"].values()))).all() for h in state["state"]["history"])

    calls["train"] = 0
    with pytest.raises(NonFiniteError, match="depth"):
        run_experiment(compose_config([*config, "trainer.on_nonfinite=stop"]), tmp_path / "stop")
    failed = json.loads((tmp_path / "stop" / "results.json").read_text())
    assert failed["status"] == "failed" and "NonFiniteError" in failed["error"]
    assert (tmp_path / "stop" / "error.txt").exists()


@pytest.mark.slow
def test_sweep_with_a_failing_job_finishes_the_others(tmp_path: Path) -> None:
    result = run_cli(["-m", *TINY, "dataset.num_train=64,0"], cwd=tmp_path)
    assert result.returncode == 1
    assert "1 job(s) of the sweep did not complete" in result.stderr
    sweep = next((tmp_path / "outputs" / "multirun").iterdir())
    ok = json.loads((sweep / "dataset.num_train=64" / "results.json").read_text())
    bad = json.loads((sweep / "dataset.num_train=0" / "results.json").read_text())
    assert ok["status"] == "completed"
    assert bad["status"] == "failed" and "dataset.num_train" in bad["error"]


@pytest.mark.slow
def test_incompatible_choices_fail_before_training(tmp_path: Path) -> None:
    result = run_cli([*TINY, "balancer=static", "balancer.weights={foo: 1.0}"], cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "balancer.weights.foo" in lines[0]
    runs = list((tmp_path / "outputs" / "runs").iterdir())
    assert not (runs[0] / "checkpoints").exists()


@pytest.mark.slow
def test_deterministic_mode_trains(tmp_path: Path) -> None:
    os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    try:
        results = run_experiment(compose_config([*TINY, "trainer.deterministic=true"]), tmp_path)
        assert results["status"] == "completed"
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
