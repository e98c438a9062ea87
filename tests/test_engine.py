"""The per-task gradient engine: every path gives the gradients it promises."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from mtl_runner.data.synthetic_scenes import synthetic_scenes
from mtl_runner.models.backbones import SmallCNN
from mtl_runner.models.sharing.hard import HardSharing
from mtl_runner.optim.balancers.uniform import Uniform
from mtl_runner.optim.jacobian import GradientEngine
from mtl_runner.optim.jacobian.strategy import AUTO_TRIALS
from mtl_runner.optim.surgery.base import GramianWeighting
from mtl_runner.optim.surgery.none import NoSurgery
from tests.conftest import FixedWeights


class HalfFirst(GramianWeighting):
    """A toy row weighting (0.5 on task 0, 1 elsewhere) to check the plumbing."""

    def solve(self, gramian: torch.Tensor, losses: torch.Tensor | None = None) -> torch.Tensor:
        w = torch.ones(gramian.shape[0], dtype=gramian.dtype)
        w[0] = 0.5
        return w


@pytest.fixture(scope="module")
def batch():
    ts = synthetic_scenes(image_size=32, num_train=8, num_val=1, num_test=1)
    x, y = next(ts.train.batches(8, shuffle=False, generator=None, device=torch.device("cpu")))
    return ts, x, y


def _model(ts):
    torch.manual_seed(0)
    model = HardSharing(partial(SmallCNN, ts.input_shape, (8, 8, 8, 8)), ts.tasks, ts.input_shape)
    model.eval()  # fixed BatchNorm statistics so every path sees the same function
    return model


def _grads(ts, x, y, balancer, surgery, strategy, need_jacobian):
    model = _model(ts)
    balancer.setup(ts.tasks, None)
    engine = GradientEngine(model, balancer, surgery, strategy)
    out = engine.forward(x)
    losses = torch.stack([t.loss(out[t.name], y[t.name]) for t in ts.tasks])
    engine.backward(losses, balancer.weights(losses), need_jacobian=need_jacobian)
    return {n: p.grad.clone() for n, p in model.named_parameters()}, model, losses


def _reference(ts, x, y, weights, row_weights=None):
    """Autograd of the weighted sum, with per-task weights on the encoder."""
    model = _model(ts)
    out = model(x)
    losses = torch.stack([t.loss(out[t.name], y[t.name]) for t in ts.tasks])
    heads = [p for n, p in model.named_parameters() if n.startswith("heads")]
    head = torch.autograd.grad((weights * losses).sum(), heads, retain_graph=True)
    enc_w = weights if row_weights is None else weights * row_weights
    enc = torch.autograd.grad((enc_w * losses).sum(), list(model.encoder.parameters()))
    names = [n for n, _ in model.named_parameters() if n.startswith("heads")] + [f"encoder.{n}" for n, _ in model.encoder.named_parameters()]
    return dict(zip(names, list(head) + list(enc)))


@pytest.mark.parametrize("strategy", ["batched", "sequential"])
@pytest.mark.parametrize("need_jacobian", [False, True])
def test_none_matches_weighted_sum(batch, strategy, need_jacobian) -> None:
    ts, x, y = batch
    w = [1.0, 0.1, 2.0]
    grads, _, _ = _grads(ts, x, y, FixedWeights(w), NoSurgery(), strategy, need_jacobian)
    ref = _reference(ts, x, y, torch.tensor(w))
    for name, g in ref.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("space", ["params", "features"])
def test_row_weighting_scales_encoder_rows_only(batch, space) -> None:
    ts, x, y = batch
    w = torch.tensor([1.0, 0.1, 2.0])
    grads, _, _ = _grads(ts, x, y, FixedWeights(w.tolist()), HalfFirst(space=space), "batched", True)
    ref = _reference(ts, x, y, w, row_weights=torch.tensor([0.5, 1.0, 1.0]))
    for name, g in ref.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_auto_settles_on_one_strategy(batch) -> None:
    ts, x, y = batch
    model = _model(ts)
    balancer = Uniform()
    balancer.setup(ts.tasks, None)
    engine = GradientEngine(model, balancer, HalfFirst(), "auto")
    tried = []
    for _ in range(2 + 2 * AUTO_TRIALS):
        model.zero_grad()
        out = engine.forward(x)
        losses = torch.stack([t.loss(out[t.name], y[t.name]) for t in ts.tasks])
        tried.append(engine.choice.choose())
        engine.backward(losses, balancer.weights(losses))
    # vmap's warm-up call, then turns (load hits both alike), then the choice sticks.
    assert tried[: 1 + 2 * AUTO_TRIALS] == ["batched"] + ["sequential", "batched"] * AUTO_TRIALS
    assert engine.strategy in ("batched", "sequential") and tried[-1] == engine.strategy


class OneRank:
    """A one-rank group as the engine sees it (optim/reduction.py's protocol): means are
    the identity; it records what the engine averaged."""

    def __init__(self) -> None:
        self.averaged: list[tuple[str, int]] = []

    def mean_(self, tensors) -> None:
        self.averaged.append(("rows", len(list(tensors))))

    def mean_grads_(self, params) -> None:
        self.averaged.append(("grads", sum(1 for p in params if p.grad is not None)))


@pytest.mark.parametrize("surgery", [NoSurgery, HalfFirst], ids=["fast_path", "params_path"])
def test_engine_averages_through_the_reduction_protocol(batch, surgery) -> None:
    ts, x, y = batch
    alone, _, _ = _grads(ts, x, y, Uniform(), surgery(), "sequential", False)
    model = _model(ts)
    balancer = Uniform()
    balancer.setup(ts.tasks, None)
    group = OneRank()
    engine = GradientEngine(model, balancer, surgery(), "sequential", group)
    out = engine.forward(x)
    losses = torch.stack([t.loss(out[t.name], y[t.name]) for t in ts.tasks])
    engine.backward(losses, balancer.weights(losses))
    heads = sum(1 for n, _ in model.named_parameters() if n.startswith("heads"))
    if surgery is NoSurgery:  # the summed gradient of every parameter, once
        assert group.averaged == [("grads", sum(1 for _ in model.parameters()))]
    else:  # the Jacobian and every head gradient, before the surgery acts
        assert group.averaged == [("rows", 1 + heads)]
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, alone[name]), name


def test_features_space_needs_a_row_weighting() -> None:
    class Elementwise(NoSurgery):
        is_row_weighting = False

    with pytest.raises(ValueError, match="surgery.space=params"):
        Elementwise(space="features")
