"""The engine's fast paths give what the plain definitions give: per-task passes from each
task's own loss, the params-space split at the shared representation, and surgery run on
the unweighted Jacobian (Gramian, non-finite rows, balancer weights folded in)."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from mtl_runner.data.synthetic_scenes import synthetic_scenes
from mtl_runner.models.backbones import SmallCNN
from mtl_runner.models.sharing.hard import HardSharing
from mtl_runner.optim.balancers.uniform import Uniform
from mtl_runner.optim.jacobian import GradientEngine
from mtl_runner.optim.surgery.base import GramianWeighting
from mtl_runner.optim.surgery.mgda import MGDA
from mtl_runner.optim.surgery.pcgrad import PCGrad
from mtl_runner.optim.surgery.upgrad import UPGrad
from tests.conftest import FixedWeights


class NotSplit(HardSharing):
    """The same model without the declared shared representation: the engine takes the
    generic params-space path (per-task passes through the whole model)."""

    supports_features_space = False


@pytest.fixture(scope="module")
def batch():
    ts = synthetic_scenes(image_size=16, num_train=8, num_val=1, num_test=1)
    x, y = next(ts.train.batches(8, shuffle=False, generator=None, device=torch.device("cpu")))
    return ts, x, y


def _model(ts, cls=HardSharing):
    torch.manual_seed(0)
    model = cls(partial(SmallCNN, ts.input_shape, (8, 8, 8, 8)), ts.tasks, ts.input_shape)
    return model.eval()  # fixed BatchNorm statistics: every path sees the same function


def _losses(ts, out, y, poison=None):
    """The stacked task losses; ``poison``: that task's loss (and so its gradient row) is
    not finite."""
    losses = [t.loss(out[t.name], y[t.name]) for t in ts.tasks]
    if poison is not None:
        losses[poison] = losses[poison] * float("nan")
    return torch.stack(losses)


def _step(ts, x, y, surgery, *, balancer=None, strategy="sequential", cls=HardSharing, poison=None, stacked=True):
    model = _model(ts, cls)
    balancer = balancer if balancer is not None else Uniform()
    balancer.setup(ts.tasks, None)
    surgery.setup(len(ts.tasks), torch.Generator().manual_seed(0))
    engine = GradientEngine(model, balancer, surgery, strategy)
    losses = _losses(ts, engine.forward(x), y, poison)
    if not stacked:  # not torch.stack's output: the passes start from the loss vector
        losses = losses * 1.0
    grads = engine.backward(losses, balancer.weights(losses))
    return model, grads


def _reference_rows(ts, x, y):
    model = _model(ts)
    losses = _losses(ts, model(x), y)
    encoder = list(model.encoder.parameters())
    rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, encoder, retain_graph=True)]) for loss in losses]
    return torch.stack(rows)


def _encoder_grad(model):
    return torch.cat([p.grad.reshape(-1) for p in model.encoder.parameters()])


@pytest.mark.parametrize("strategy", ["sequential", "batched"])
@pytest.mark.parametrize("make", [PCGrad, MGDA, UPGrad], ids=["pcgrad", "mgda", "upgrad"])
def test_split_path_equals_the_generic_path_bit_for_bit(batch, make, strategy) -> None:
    ts, x, y = batch
    split, split_grads = _step(ts, x, y, make(), strategy=strategy)
    generic, generic_grads = _step(ts, x, y, make(), strategy=strategy, cls=NotSplit)
    assert torch.equal(split_grads.jacobian, generic_grads.jacobian)
    for (name, a), b in zip(split.named_parameters(), generic.parameters()):
        assert torch.equal(a.grad, b.grad), name


@pytest.mark.parametrize("strategy", ["sequential", "batched"])
@pytest.mark.parametrize("space", ["params", "features"])
def test_passes_from_the_loss_vector_give_the_same_rows(batch, space, strategy) -> None:
    """Losses that are not torch.stack's output (no per-task gradient edges)."""
    ts, x, y = batch
    edges, edges_grads = _step(ts, x, y, PCGrad(space=space), strategy=strategy)
    vector, vector_grads = _step(ts, x, y, PCGrad(space=space), strategy=strategy, stacked=False)
    assert torch.equal(edges_grads.jacobian, vector_grads.jacobian)
    for (name, a), b in zip(edges.named_parameters(), vector.parameters()):
        assert torch.equal(a.grad, b.grad), name


@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.5, 2.0, 0.1]], ids=["uniform", "fixed"])
@pytest.mark.parametrize("make", [PCGrad, MGDA, UPGrad], ids=["pcgrad", "mgda", "upgrad"])
def test_surgery_sees_the_balancer_scaled_rows(batch, make, weights) -> None:
    """The engine folds the balancer's weights into the Gramian and the direction: the
    same as calling the surgery on ``w[:, None] * J``."""
    ts, x, y = batch
    model, grads = _step(ts, x, y, make(), balancer=FixedWeights(weights))
    rows = _reference_rows(ts, x, y)
    torch.testing.assert_close(grads.jacobian, rows, rtol=1e-5, atol=1e-7)
    reference = make()
    reference.setup(len(ts.tasks), torch.Generator().manual_seed(0))
    direction = reference(torch.tensor(weights)[:, None] * rows)
    torch.testing.assert_close(_encoder_grad(model), direction, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads.surgery_weights, reference.last_weights, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("space", ["params", "features"])
def test_a_nonfinite_row_is_dropped(batch, space) -> None:
    ts, x, y = batch
    model, grads = _step(ts, x, y, UPGrad(space=space), poison=1)
    assert grads.surgery_weights is not None and grads.surgery_weights[1] == 0
    assert not torch.isfinite(grads.jacobian[1]).all(), "the returned rows are the raw ones"
    for name, p in model.named_parameters():
        if not name.startswith("heads.depth"):
            assert torch.isfinite(p.grad).all(), name
    if space == "params":
        rows = _reference_rows(ts, x, y)
        rows[1] = 0
        reference = UPGrad()
        torch.testing.assert_close(_encoder_grad(model), reference(rows), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("space", ["params", "features"])
def test_each_task_pass_runs_only_its_own_head(batch, space) -> None:
    ts, x, y = batch
    model = _model(ts)
    calls = {name: 0 for name in model.heads}
    for name, head in model.heads.items():
        head.register_full_backward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    balancer = Uniform()
    balancer.setup(ts.tasks, None)
    engine = GradientEngine(model, balancer, PCGrad(space=space), "sequential")
    losses = _losses(ts, engine.forward(x), y)
    engine.backward(losses, balancer.weights(losses))
    assert calls == {name: 1 for name in model.heads}


def test_grads_do_not_alias_the_returned_jacobian(batch) -> None:
    ts, x, y = batch
    model, grads = _step(ts, x, y, PCGrad())
    before = grads.jacobian.clone()
    for p in model.parameters():
        p.grad.mul_(3.0)  # what gradient clipping does in place
    assert torch.equal(grads.jacobian, before)


def test_surgery_weights_run_on_one_thread_and_threads_are_restored(batch) -> None:
    seen = []

    class Recording(GramianWeighting):
        def solve(self, gramian: torch.Tensor, losses: torch.Tensor | None = None) -> torch.Tensor:
            seen.append(torch.get_num_threads())
            return torch.ones(gramian.shape[0], dtype=gramian.dtype)

    ts, x, y = batch
    threads = torch.get_num_threads()
    _step(ts, x, y, Recording())
    assert seen == [1]
    assert torch.get_num_threads() == threads
