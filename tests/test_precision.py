"""Mixed precision: fp16 loss scaling is invisible to balancers and surgery, overflows are
absorbed by the scaler, and the reduced-precision paths train end to end."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import torch

from mtl_runner.data.synthetic_scenes import synthetic_scenes
from mtl_runner.models.backbones import SmallCNN
from mtl_runner.models.sharing.hard import HardSharing
from mtl_runner.optim.balancers.uniform import Uniform
from mtl_runner.optim.jacobian import GradientEngine
from mtl_runner.optim.surgery.base import GramianWeighting
from mtl_runner.optim.surgery.none import NoSurgery
from mtl_runner.train.precision import LossScaler
from tests.conftest import run_cli


class InverseNormWeights(GramianWeighting):
    """Weights 1/||g_t||: a direction that changes if the rows arrive scaled."""

    def solve(self, gramian: torch.Tensor, losses: torch.Tensor | None = None) -> torch.Tensor:
        return gramian.diagonal().clamp_min(1e-30).rsqrt()


@pytest.fixture(scope="module")
def batch():
    ts = synthetic_scenes(image_size=32, num_train=8, num_val=1, num_test=1)
    x, y = next(ts.train.batches(8, shuffle=False, generator=None, device=torch.device("cpu")))
    return ts, x, y


def _grads(batch, surgery, loss_scale, need_jacobian):
    ts, x, y = batch
    torch.manual_seed(0)
    model = HardSharing(partial(SmallCNN, ts.input_shape, (8, 8, 8, 8)), ts.tasks, ts.input_shape).eval()
    balancer = Uniform()
    balancer.setup(ts.tasks, None)
    engine = GradientEngine(model, balancer, surgery, "sequential")
    out = engine.forward(x)
    losses = torch.stack([t.loss(out[t.name], y[t.name]) for t in ts.tasks])
    engine.backward(losses, balancer.weights(losses), need_jacobian=need_jacobian, loss_scale=loss_scale)
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    ("surgery", "need_jacobian"),
    [
        (NoSurgery(), False),  # fast path: one backward of the scaled sum
        (NoSurgery(), True),  # per-task rows (a diagnostics step)
        (InverseNormWeights(), False),  # surgery on the params-space Jacobian
        (InverseNormWeights(space="features"), False),  # features space
    ],
    ids=["fast", "jacobian", "params-surgery", "features-surgery"],
)
def test_loss_scale_is_undone_before_surgery_and_in_grad(batch, surgery, need_jacobian) -> None:
    # A power-of-two scale is exact in floating point: unscaled gradients must match bit
    # for bit; a surgery that saw scaled rows would give 1/||S g|| weights instead.
    plain = _grads(batch, surgery, None, need_jacobian)
    scaled = _grads(batch, surgery, 2.0**12, need_jacobian)
    for name, grad in plain.items():
        torch.testing.assert_close(scaled[name], grad, rtol=1e-6, atol=0, msg=name)


def test_loss_scaler_backs_off_on_overflow_and_grows_after_clean_steps() -> None:
    scaler = LossScaler(init_scale=8.0, growth_interval=3, min_scale=1.0)
    assert scaler.update(False) and scaler.scale == 4.0
    assert not any(scaler.update(True) for _ in range(2)) and scaler.scale == 4.0
    scaler.update(True)
    assert scaler.scale == 8.0
    state = scaler.state_dict()
    for _ in range(3):
        scaler.update(False)
    assert scaler.scale == 1.0
    assert not scaler.update(False), "below min_scale an overflow is a genuine non-finite step"
    scaler.load_state_dict(state)
    assert scaler.scale == 8.0


def _results(cwd: Path) -> dict:
    (path,) = cwd.glob("outputs/runs/*/results.json")
    return json.loads(path.read_text())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.slow
def test_reduced_precision_run_completes(tmp_path: Path, tiny: list[str], precision: str) -> None:
    proc = run_cli([*tiny, f"trainer.precision={precision}", "trainer.channels_last=always", "diagnostics.every_n_steps=2"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    results = _results(tmp_path)
    assert results["status"] == "completed"
    assert results["nonfinite_steps"] == 0
    assert all(v["mtl"] == v["mtl"] for t in results["tasks"].values() for v in t["metrics"].values())


@pytest.mark.slow
def test_bad_precision_is_a_one_line_error(tmp_path: Path) -> None:
    proc = run_cli(["trainer.precision=fp8"], tmp_path)
    assert proc.returncode == 2
    assert "trainer.precision" in proc.stderr and "bf16" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "outputs").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_with_data_on_device(tmp_path: Path, tiny: list[str]) -> None:
    proc = run_cli([*tiny, "trainer.device=cuda", "trainer.precision=bf16"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert _results(tmp_path)["device"].startswith("cuda")
