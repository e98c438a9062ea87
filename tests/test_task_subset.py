"""``surgery.task_subset``: the many-task estimator (docs/methods.md#task-subsets) computes
the rows of ``k`` sampled tasks per step, is the exact method for ``k >= T``, is unbiased
for the sum, reproducible from the seed, and refuses what it cannot serve."""

from __future__ import annotations

import itertools
from functools import partial

import pytest
import torch
from hydra.utils import get_object, instantiate
from omegaconf import OmegaConf

from mtl_runner import build
from mtl_runner.config import CONF_DIR, validate
from mtl_runner.errors import ConfigError
from mtl_runner.models.backbones import MLP
from mtl_runner.models.sharing.hard import HardSharing
from mtl_runner.optim.balancers.gradnorm import GradNorm
from mtl_runner.optim.balancers.uniform import Uniform
from mtl_runner.optim.jacobian import GradientEngine
from mtl_runner.optim.surgery.base import GramianWeighting, Surgery, task_subset_methods
from mtl_runner.tasks import Task
from scripts import bench_task_subset as bench
from tests.conftest import FixedWeights, compose_config, conf_options

NUM_TASKS = 6
TASKS = [Task(f"r{t}", "regression", 1) for t in range(NUM_TASKS)]


class Sum(GramianWeighting):
    """Weights 1: ``none``'s direction, as a row weighting that allows subsets."""

    def solve(self, gramian: torch.Tensor, losses: torch.Tensor | None = None) -> torch.Tensor:
        return torch.ones(gramian.shape[0], dtype=gramian.dtype)


class NotSplit(HardSharing):
    """Without the declared representation: per-task passes through the whole model."""

    supports_features_space = False


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(16, 8, generator=generator)
    return x, {t.name: x[:, i : i + 1] + 0.1 * torch.randn(16, 1, generator=generator) for i, t in enumerate(TASKS)}


def _model(cls=HardSharing) -> HardSharing:
    torch.manual_seed(0)
    return cls(partial(MLP, (8,), (16, 16)), TASKS, (8,))


def _surgery(name: str, task_subset: int | None, seed: int = 0) -> Surgery:
    surgery = instantiate(OmegaConf.load(CONF_DIR / "surgery" / f"{name}.yaml"), task_subset=task_subset)
    surgery.setup(NUM_TASKS, torch.Generator().manual_seed(seed))
    return surgery


def _step(
    model, surgery, batch, *, balancer=None, strategy="sequential", need_jacobian=False, loss_scale=None, reduction=None, poison=None
):
    """One engine step; ``poison``: that task's loss (so its row) is not finite."""
    x, y = batch
    balancer = balancer if balancer is not None else Uniform()
    balancer.setup(TASKS, None)
    engine = GradientEngine(model, balancer, surgery, strategy, reduction)
    out = engine.forward(x)
    losses = torch.stack([t.loss(out[t.name], y[t.name]) * (float("nan") if i == poison else 1) for i, t in enumerate(TASKS)])
    model.zero_grad(set_to_none=True)
    grads = engine.backward(losses, balancer.weights(losses), need_jacobian=need_jacobian, loss_scale=loss_scale)
    return {n: p.grad.clone() for n, p in model.named_parameters()}, grads


@pytest.mark.parametrize("name", task_subset_methods())
def test_k_of_at_least_t_is_the_exact_method(batch, name, one_thread) -> None:
    exact, _ = _step(_model(), _surgery(name, None), batch)
    for k in (NUM_TASKS, NUM_TASKS + 3):
        subset, _ = _step(_model(), _surgery(name, k), batch)
        for key, g in exact.items():
            assert torch.equal(subset[key], g), (k, key)


def _count_encoder_passes(model: HardSharing) -> list[int]:
    """Backward passes that reach the encoder's first layer (its output's hook fires once
    per pass, a batched pass included)."""
    count = [0]

    def on_forward(module, inputs, output):
        output.register_hook(lambda grad: count.__setitem__(0, count[0] + 1))

    model.encoder.stages[0][1].register_forward_hook(on_forward)
    return count


@pytest.mark.parametrize("cls", [HardSharing, NotSplit], ids=["split", "generic"])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_k_tasks_take_k_passes_through_the_encoder(batch, cls, k) -> None:
    model = _model(cls)
    count = _count_encoder_passes(model)
    _step(model, _surgery("upgrad", k), batch)
    assert count[0] == k
    exact = _model(cls)
    count = _count_encoder_passes(exact)
    _step(exact, _surgery("upgrad", None), batch)
    assert count[0] == NUM_TASKS


@pytest.mark.parametrize("cls", [HardSharing, NotSplit], ids=["split", "generic"])
def test_heads_get_every_tasks_exact_gradient(batch, cls) -> None:
    weights = FixedWeights([1.0, 0.5, 2.0, 1.0, 0.25, 3.0])
    exact, _ = _step(_model(cls), _surgery("mgda", None), batch, balancer=weights)
    subset, grads = _step(_model(cls), _surgery("mgda", 2), batch, balancer=weights)
    heads = [key for key in exact if key.startswith("heads")]
    assert heads
    for key in heads:
        torch.testing.assert_close(subset[key], exact[key], rtol=1e-6, atol=0)
    assert grads.jacobian is None  # only two rows were computed: no Jacobian to report


def test_batched_and_sequential_passes_give_the_same_estimate(batch) -> None:
    sequential, _ = _step(_model(), _surgery("pcgrad", 3), batch, strategy="sequential")
    batched, _ = _step(_model(), _surgery("pcgrad", 3), batch, strategy="batched")
    for key, g in sequential.items():
        torch.testing.assert_close(batched[key], g, rtol=1e-5, atol=1e-7)


def test_the_sum_is_estimated_without_bias() -> None:
    """Averaged over every subset of k tasks (all equally likely), the estimate of the
    sum is the sum: T/k times each row's inclusion probability k/T. Balancer weights
    scale the rows either way."""
    jacobian = torch.randn(NUM_TASKS, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    row_scale = torch.tensor([1.0, 0.5, 2.0, 1.0, 0.25, 3.0], dtype=torch.float64)
    for k in (1, 2, 4):
        surgery = Sum(task_subset=k)
        estimates = [
            surgery.sampled_direction(jacobian[list(s)], torch.tensor(s), NUM_TASKS, row_scale=row_scale)
            for s in itertools.combinations(range(NUM_TASKS), k)
        ]
        torch.testing.assert_close(torch.stack(estimates).mean(0), row_scale @ jacobian)


def test_subsets_are_uniform_and_sorted() -> None:
    surgery = Sum(task_subset=2)
    surgery.setup(NUM_TASKS, torch.Generator().manual_seed(0))
    draws = [surgery.sample_tasks(NUM_TASKS) for _ in range(3000)]
    assert all(d.numel() == 2 and bool((d[1:] > d[:-1]).all()) for d in draws)
    counts = torch.bincount(torch.cat(draws), minlength=NUM_TASKS).double()
    # each task is drawn with probability k/T = 1/3: 1000 expected, sd about 26
    assert bool(((counts - 1000).abs() < 130).all()), counts


def test_logged_weights_are_zero_for_unsampled_tasks(batch) -> None:
    surgery = Sum(task_subset=2)
    surgery.setup(NUM_TASKS, torch.Generator().manual_seed(0))
    _, grads = _step(_model(), surgery, batch)
    weights = grads.surgery_weights
    assert weights.shape == (NUM_TASKS,)
    assert sorted(weights.tolist()) == [0.0] * 4 + [NUM_TASKS / 2] * 2


def test_a_seed_reproduces_the_subsets_and_a_resume_continues_them(batch) -> None:
    first, second = _surgery("upgrad", 2, seed=3), _surgery("upgrad", 2, seed=3)
    assert all(torch.equal(first.sample_tasks(NUM_TASKS), second.sample_tasks(NUM_TASKS)) for _ in range(20))
    other = _surgery("upgrad", 2, seed=4)
    assert any(not torch.equal(first.sample_tasks(NUM_TASKS), other.sample_tasks(NUM_TASKS)) for _ in range(20))
    resumed = _surgery("upgrad", 2, seed=99)
    resumed.load_state_dict(first.state_dict())
    assert all(torch.equal(first.sample_tasks(NUM_TASKS), resumed.sample_tasks(NUM_TASKS)) for _ in range(20))
    one, _ = _step(_model(), _surgery("upgrad", 2, seed=3), batch)
    two, _ = _step(_model(), _surgery("upgrad", 2, seed=3), batch)
    assert all(torch.equal(one[key], two[key]) for key in one)


class RecordingRank:
    """A rank of a group as the engine sees it (optim/reduction.py): means are the
    identity; it records the shapes it averaged."""

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []

    def mean_(self, tensors) -> None:
        self.shapes += [tuple(t.shape) for t in tensors]

    def mean_grads_(self, params) -> None:
        raise AssertionError("the params path averages rows, not .grad")


def test_ranks_draw_the_same_subsets_and_average_the_sampled_rows(batch) -> None:
    """Every rank seeds the method generator alike (trainer.seed + 1), so every rank
    draws the same subsets; the reduction sees the k sampled rows and every head."""
    ranks = [RecordingRank(), RecordingRank()]
    results = [_step(_model(), _surgery("pcgrad", 2, seed=5), batch, reduction=rank)[0] for rank in ranks]
    assert all(torch.equal(results[0][key], results[1][key]) for key in results[0])
    model = _model()
    heads = sum(1 for key, _ in model.named_parameters() if key.startswith("heads"))
    assert ranks[0].shapes[0] == (2, sum(p.numel() for p in model.encoder.parameters()))
    assert len(ranks[0].shapes) == 1 + heads


def test_a_diagnostics_step_sees_every_row_and_the_same_direction(batch) -> None:
    plain, without = _step(_model(), _surgery("cagrad", 2), batch)
    looked, grads = _step(_model(), _surgery("cagrad", 2), batch, need_jacobian=True)
    assert without.jacobian is None and grads.jacobian.shape[0] == NUM_TASKS
    for key, g in plain.items():
        torch.testing.assert_close(looked[key], g, rtol=1e-6, atol=1e-9)


def test_loss_scaling_and_a_nonfinite_sampled_row(batch) -> None:
    unscaled, _ = _step(_model(), _surgery("upgrad", 3), batch)
    scaled, _ = _step(_model(), _surgery("upgrad", 3), batch, loss_scale=1024.0)
    for key, g in unscaled.items():
        torch.testing.assert_close(scaled[key], g, rtol=1e-5, atol=1e-7)
    surgery = _surgery("upgrad", NUM_TASKS - 1)  # task 0 is sampled in 5 draws of 6
    for _ in range(4):
        grads, step = _step(_model(), surgery, batch, poison=0)
        assert all(bool(torch.isfinite(g).all()) for key, g in grads.items() if key.startswith("encoder"))
        assert step.surgery_weights[0] == 0


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["surgery=gradvac", "surgery.task_subset=4"], r"surgery\.task_subset .*pcgrad.*surgery=gradvac"),
        (["surgery=none", "surgery.task_subset=4"], r"surgery\.task_subset .*upgrad.*surgery=none"),
        (["surgery=upgrad", "surgery.task_subset=0"], r"surgery\.task_subset must be null \(exact\) or an integer >= 1"),
        (["surgery=mgda", "surgery.space=features", "surgery.task_subset=4"], r"surgery\.task_subset .*surgery\.space=params"),
    ],
)
def test_bad_settings_are_one_line_config_errors(overrides: list[str], fragment: str) -> None:
    cfg = compose_config(overrides)
    with pytest.raises(ConfigError, match=fragment) as info:
        validate(cfg)
        build.build_surgery(cfg)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", conf_options("surgery"))
def test_every_method_takes_the_setting_and_allows_or_refuses_it(name: str) -> None:
    """Every YAML lists the key (null); its class accepts it, and either allows it (then it
    is in the refusal's list) or refuses it in one line naming the key."""
    node = OmegaConf.load(CONF_DIR / "surgery" / f"{name}.yaml")
    assert "task_subset" in node and node.task_subset is None
    arguments = {key: value for key, value in OmegaConf.to_container(node).items() if key != "_target_"}
    method = get_object(node._target_)
    if name in task_subset_methods():
        assert method(**{**arguments, "task_subset": 2}).task_subset == 2
    else:
        with pytest.raises(ValueError, match=rf"^surgery\.task_subset .*; surgery={name} does not"):
            method(**{**arguments, "task_subset": 2})


def test_a_balancer_reading_the_rows_is_refused_before_the_run() -> None:
    with pytest.raises(ValueError, match=r"surgery\.task_subset .*balancer=gradnorm"):
        GradientEngine(_model(), GradNorm(), _surgery("pcgrad", 2), "sequential")
    cfg = compose_config(["surgery=pcgrad", "surgery.task_subset=2", "balancer=dbmtl"])
    with pytest.raises(ConfigError, match=r"surgery\.task_subset .*balancer=dbmtl"):
        build.check_compatible(cfg)  # preflight's check: before a run directory exists


@pytest.mark.slow
def test_the_benchmark_script_measures_every_cell(one_thread) -> None:
    """scripts/bench_task_subset.py on a 4-task copy of its workload, a few steps: every
    (method, k) cell gets batches x draws readings, every column a time, every run a loss."""
    workload = bench.mlp(4, torch.device("cpu"))
    batches = bench.teacher_batches(workload, 2, seed=0)
    found = bench.errors(workload, batches, ["sum", "upgrad"], [2, 3], draws=2)
    assert sorted(found) == [("sum", 2), ("sum", 3), ("upgrad", 2), ("upgrad", 3)]
    for cosines, relative in found.values():
        assert len(cosines) == len(relative) == 4
        assert all(-1 - 1e-9 <= c <= 1 + 1e-9 for c in cosines) and all(r >= 0 for r in relative)
    times = bench.timings(workload, ["upgrad"], [2], warmup=0, rounds=1)
    assert list(times) == ["plain", "upgrad exact", "upgrad k=2"] and all(ms > 0 for ms in times.values())
    assert bench.train(workload, batches, "upgrad", 2, steps=3, seed=0) > 0
