"""Surgery methods that need J itself or keep state: graddrop, gradvac, nash_mtl. Each
paper's defining property, seeded reproducibility, state round trips, and short
end-to-end runs including an exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import Tensor

from mtl_runner.cli import CONF_DIR
from mtl_runner.optim.surgery import nash_mtl
from mtl_runner.optim.surgery.base import Surgery
from mtl_runner.optim.surgery.graddrop import GradDrop
from mtl_runner.optim.surgery.gradvac import GradVac
from mtl_runner.optim.surgery.nash_mtl import NashMTL
from mtl_runner.runner import run_experiment
from tests.conftest import TINY, compose_config

F64 = torch.float64
SMALLER = ["dataset.num_train=16", "dataset.num_val=8", "dataset.num_test=8", "dataset.image_size=16", "trainer.batch_size=8"]


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rows(num_tasks: int, dim: int = 30, seed: int = 0) -> Tensor:
    return torch.randn(num_tasks, dim, generator=seeded(seed), dtype=F64)


def make(name: str, num_tasks: int, seed: int = 0, **options: object) -> Surgery:
    cfg = OmegaConf.load(CONF_DIR / "surgery" / f"{name}.yaml")
    surgery = instantiate(cfg, **options)
    surgery.setup(num_tasks, seeded(seed))
    return surgery


# ---------------------------------------------------------------------- graddrop
def test_graddrop_with_agreeing_signs_is_the_sum() -> None:
    signs = torch.where(torch.rand(40, generator=seeded(1)) > 0.5, 1.0, -1.0).to(F64)
    jacobian = rows(4, 40, seed=2).abs() * signs  # each column has one sign across tasks
    assert torch.equal(make("graddrop", 4)(jacobian), jacobian.sum(0))


def test_graddrop_keeps_only_one_sign_per_coordinate() -> None:
    jacobian = rows(5, 400, seed=3)
    d = make("graddrop", 5)(jacobian)
    positive, negative = jacobian.clamp_min(0).sum(0), jacobian.clamp_max(0).sum(0)
    took_positive = d == positive
    assert torch.all(took_positive | (d == negative))
    # The positive sign wins more often where the sign purity is higher.
    purity = 0.5 * (1 + jacobian.sum(0) / jacobian.abs().sum(0))
    assert purity[took_positive].mean() > 0.5 > purity[~took_positive].mean()


def test_graddrop_sign_frequency_follows_purity() -> None:
    """P(keep positive) = P: with one coordinate of purity 0.8 drawn many times."""
    jacobian = torch.tensor([[4.0], [1.0], [-1.25]], dtype=F64)  # P = 0.5 (1 + 3.75 / 6.25) = 0.8
    surgery = make("graddrop", 3, seed=5)
    kept_positive = torch.stack([surgery(jacobian)[0] > 0 for _ in range(4000)]).to(F64).mean()
    assert kept_positive.item() == pytest.approx(0.8, abs=0.03)


def test_graddrop_is_reproducible_from_the_seed_and_leaks() -> None:
    jacobian = rows(3, 200, seed=6)
    first, again, other = (make("graddrop", 3, seed=s)(jacobian) for s in (0, 0, 9))
    assert torch.equal(first, again) and not torch.equal(first, other)
    full_leak = make("graddrop", 3, leak=1.0)(jacobian)
    assert torch.allclose(full_leak, jacobian.sum(0))
    half = make("graddrop", 3, seed=0, leak=0.5)(jacobian)
    assert torch.allclose(half, 0.5 * jacobian.sum(0) + 0.5 * first)


def test_graddrop_rejects_features_space_and_bad_leak() -> None:
    with pytest.raises(ValueError, match="space=params"):
        GradDrop(space="features")
    with pytest.raises(ValueError, match="surgery.leak"):
        GradDrop(leak=1.5)


# ----------------------------------------------------------------------- gradvac
def test_gradvac_leaves_pairs_above_their_target_alone() -> None:
    jacobian = rows(3, 20, seed=7).abs()  # all cosines positive, targets start at 0
    surgery = make("gradvac", 3)
    assert torch.allclose(surgery(jacobian), jacobian.sum(0))


def test_gradvac_correction_reaches_the_target_cosine() -> None:
    """Two tasks, target phi_hat: the corrected g_1' has cos(g_1', g_2) = phi_hat."""
    jacobian = rows(2, 20, seed=8)
    jacobian[1] = -0.6 * jacobian[0] + 0.4 * jacobian[1]
    cosine = torch.nn.functional.cosine_similarity(jacobian[0], jacobian[1], dim=0)
    for target in (0.0, 0.3, 0.9, -0.05):
        assert cosine < target
        surgery = make("gradvac", 2)
        surgery.targets = torch.full((2, 2), target, dtype=F64)
        surgery(jacobian)
        corrected = surgery.last_weights  # d = w @ J; recover g_1' from the coefficients
        assert corrected is not None
        # g_1' = g_1 + c_12 g_2, g_2' = g_2 + c_21 g_1; solve for c from w = (1 + c_21, 1 + c_12).
        g1 = jacobian[0] + (corrected[1] - 1) * jacobian[1]
        g2 = jacobian[1] + (corrected[0] - 1) * jacobian[0]
        assert torch.nn.functional.cosine_similarity(g1, jacobian[1], dim=0) == pytest.approx(target, abs=1e-9)
        assert torch.nn.functional.cosine_similarity(g2, jacobian[0], dim=0) == pytest.approx(target, abs=1e-9)
        if target == 0.0:  # zero targets: exactly PCGrad
            pcgrad = jacobian[0] - (jacobian[0] @ jacobian[1]) / (jacobian[1] @ jacobian[1]) * jacobian[1]
            assert torch.allclose(g1, pcgrad)


def test_gradvac_targets_follow_the_ema() -> None:
    """Without conflicts nothing is corrected, so every target moves by
    phi_hat <- (1 - beta) phi_hat + beta cos(g_i, g_j), step after step."""
    jacobian = rows(3, 20, seed=9).abs()
    cosines = torch.nn.functional.cosine_similarity(jacobian[:, None], jacobian[None], dim=-1).float()
    off = ~torch.eye(3, dtype=torch.bool)
    surgery = make("gradvac", 3, beta=0.25)
    assert isinstance(surgery, GradVac) and surgery.targets is not None
    expected = torch.zeros(3, 3)
    for _ in range(3):
        surgery(jacobian)
        expected = 0.75 * expected + 0.25 * cosines
        assert torch.allclose(surgery.targets[off], expected[off], atol=1e-6)
    assert torch.all(surgery.targets.diagonal() == 0)


@pytest.mark.parametrize("name", ["gradvac", "nash_mtl"])
def test_state_dict_round_trip_gives_identical_next_outputs(name: str) -> None:
    options = {"update_weights_every": 2} if name == "nash_mtl" else {}
    first = make(name, 4, seed=3, **options)
    for step in range(3):
        first(rows(4, 25, seed=step))
    state = first.state_dict()
    saved_generator = first.generator.get_state()  # type: ignore[union-attr]
    expected = [first(rows(4, 25, seed=10 + k)) for k in range(3)]

    second = make(name, 4, seed=99, **options)
    second.load_state_dict(state)
    second.generator.set_state(saved_generator)  # type: ignore[union-attr]
    got = [second(rows(4, 25, seed=10 + k)) for k in range(3)]
    for a, b in zip(expected, got):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------- nash_mtl
@pytest.mark.parametrize("num_tasks", [2, 3, 5, 10])
def test_nash_solution_satisfies_the_bargaining_equations(num_tasks: int) -> None:
    jacobian = rows(num_tasks, 40, seed=num_tasks)
    surgery = make("nash_mtl", num_tasks, max_norm=0.0)
    d = surgery(jacobian)
    alpha = surgery.last_weights
    assert alpha is not None and torch.all(alpha > 0)
    products = alpha * (jacobian @ jacobian.T @ alpha)  # alpha_i (M alpha)_i, i.e. alpha_i g_i . d
    assert torch.allclose(products, torch.ones_like(products), atol=1e-6)
    assert torch.allclose(d, alpha @ jacobian)


@pytest.mark.parametrize("num_tasks", [3, 10])
def test_nash_stops_early_on_the_cpu_with_the_full_loops_result(num_tasks: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once Newton no longer moves, later iterations repeat themselves: stopping there
    (on the CPU) gives exactly what all ``optim_niter`` iterations give (on a GPU)."""
    jacobian = rows(num_tasks, 40, seed=30 + num_tasks)
    early = make("nash_mtl", num_tasks, optim_niter=40)(jacobian)
    monkeypatch.setattr(nash_mtl, "host_resident", lambda tensor: False)
    assert torch.equal(make("nash_mtl", num_tasks, optim_niter=40)(jacobian), early)


def test_nash_direction_is_invariant_to_each_task_scale() -> None:
    """The paper: rescaling a task's loss (its gradient) leaves the update unchanged."""
    jacobian = rows(4, 40, seed=21)
    scales = torch.tensor([1e-3, 1.0, 50.0, 7.0], dtype=F64)
    d = make("nash_mtl", 4, max_norm=0.0)(jacobian)
    rescaled = make("nash_mtl", 4, max_norm=0.0)(scales[:, None] * jacobian)
    assert torch.allclose(d, rescaled, atol=1e-8)


def test_nash_clips_the_norm_and_reuses_weights_between_updates() -> None:
    jacobian = rows(3, 40, seed=22)
    clipped = make("nash_mtl", 3, max_norm=0.5)(jacobian)
    free = make("nash_mtl", 3, max_norm=0.0)(jacobian)
    assert free.norm() > 0.5 and clipped.norm() == pytest.approx(0.5)
    assert torch.allclose(clipped / clipped.norm(), free / free.norm())

    surgery = make("nash_mtl", 3, max_norm=0.0, update_weights_every=3)
    assert isinstance(surgery, NashMTL)
    weights = []
    for step in range(6):
        surgery(rows(3, 40, seed=30 + step))
        assert surgery.last_weights is not None
        weights.append(surgery.last_weights.clone())
    assert torch.equal(weights[0], weights[1]) and torch.equal(weights[0], weights[2])
    assert not torch.equal(weights[2], weights[3]) and torch.equal(weights[3], weights[5])
    assert surgery.state_dict()["step"] == 6


def test_nash_degenerate_inputs_are_defined() -> None:
    g = rows(3, 12, seed=23)
    with_zero = g.clone()
    with_zero[1] = 0
    surgery = make("nash_mtl", 3, max_norm=0.0)
    d = surgery(with_zero)
    alpha = surgery.last_weights
    assert alpha is not None and alpha[1] == 0
    kept = torch.tensor([0, 2])
    reduced = make("nash_mtl", 2, max_norm=0.0)(g[kept])
    assert torch.allclose(d, reduced)
    opposite = make("nash_mtl", 2, max_norm=0.0)(torch.stack([g[0], -g[0]]))  # Pareto stationary
    assert torch.all(torch.isfinite(opposite)) and opposite.norm() < 1e-6 * g[0].norm()
    single = make("nash_mtl", 1, max_norm=0.0)(g[:1])
    assert torch.allclose(single, g[0] / g[0].norm())


def test_nash_rejects_bad_options() -> None:
    for options, key in (({"update_weights_every": 0}, "update_weights_every"), ({"max_norm": -1.0}, "max_norm"), ({"optim_niter": 0}, "optim_niter")):
        with pytest.raises(ValueError, match=f"surgery.{key}"):
            NashMTL(**options)  # type: ignore[arg-type]


# -------------------------------------------------------------------- end to end
def test_each_method_trains_end_to_end(tmp_path: Path, one_thread: None) -> None:
    for name, space in (("graddrop", "params"), ("gradvac", "params"), ("nash_mtl", "features")):
        cfg = compose_config([*TINY, f"surgery={name}", f"surgery.space={space}", *SMALLER, "diagnostics.every_n_steps=0"])
        run_experiment(cfg, tmp_path / name)
        results = json.loads((tmp_path / name / "results.json").read_text())
        assert results["status"] == "completed", name


@pytest.mark.parametrize("name", ["gradvac", "nash_mtl", "upgrad"])
def test_resume_continues_the_state_exactly(tmp_path: Path, one_thread: None, name: str) -> None:
    """One epoch, then resume for a second: the same results as two epochs straight
    (upgrad: a solver that starts from the last step's support, see simplex.py)."""
    base = [*TINY, f"surgery={name}", *SMALLER, "trainer.lr_schedule=constant", "diagnostics.every_n_steps=0"]
    if name == "nash_mtl":
        base.append("surgery.update_weights_every=3")  # 2 steps per epoch: reuse spans the resume
    reference = run_experiment(compose_config([*base, "trainer.epochs=2"]), tmp_path / "reference")
    run_experiment(compose_config([*base, "trainer.epochs=1"]), tmp_path / "split")
    resumed = run_experiment(compose_config([*base, "trainer.epochs=2", f"resume={tmp_path / 'split'}"]), tmp_path / "split")
    assert resumed["resumed"] is True
    assert resumed["tasks"] == reference["tasks"]
