"""Surgery methods of 2023-2025: config (ConFIG), dualproj, fairgrad, sdmgrad, modo, moco,
excess_mtl. Each paper's defining property on random and adversarial Jacobians,
agreement with torchjd where it has the method (scale conventions accounted for), hand
computations where it does not, degenerate inputs, exact state round trips, no host
reads per step, and short end-to-end runs (one with an exact resume per kind of state)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import Tensor

from mtl_runner import build
from mtl_runner.cli import CONF_DIR
from mtl_runner.config import ConfigError, validate
from mtl_runner.optim.surgery import fairgrad, simplex
from mtl_runner.optim.surgery.base import GramianWeighting, Surgery
from mtl_runner.optim.surgery.excess_mtl import ExcessMTL
from mtl_runner.optim.surgery.moco import MoCo
from mtl_runner.runner import run_experiment
from tests.conftest import TINY, compose_config, refusing_host_reads

aggregation = pytest.importorskip("torchjd.aggregation")

NEW = ["config", "dualproj", "fairgrad", "sdmgrad", "modo", "moco", "excess_mtl"]
GRAMIAN = ["config", "dualproj", "fairgrad", "sdmgrad", "modo"]
STATEFUL = ["fairgrad", "sdmgrad", "modo", "moco", "excess_mtl"]
F64 = torch.float64
SMALLER = ["dataset.num_train=16", "dataset.num_val=8", "dataset.num_test=8", "dataset.image_size=16", "trainer.batch_size=8"]


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make(name: str, num_tasks: int, seed: int = 0, **options: object) -> Surgery:
    surgery = instantiate(OmegaConf.load(CONF_DIR / "surgery" / f"{name}.yaml"), **options)
    surgery.setup(num_tasks, seeded(seed))
    return surgery


def rows(num_tasks: int, dim: int = 20, seed: int = 0) -> Tensor:
    return torch.randn(num_tasks, dim, generator=seeded(seed), dtype=F64)


def conflicting(num_tasks: int, dim: int = 20, seed: int = 0) -> Tensor:
    """Random rows where the second strongly opposes the first."""
    jacobian = rows(num_tasks, dim, seed)
    if num_tasks >= 2:
        jacobian[1] = -0.7 * jacobian[0] + 0.5 * jacobian[1]
    return jacobian


def adversarial() -> list[Tensor]:
    """Strong conflicts, wildly different norms, nearly parallel rows (all full rank)."""
    g = rows(4, 12, seed=11)
    opposed = torch.stack([g[0], -0.9 * g[0] + 0.05 * g[1], g[2]])
    scaled = rows(4, 12, seed=12) * torch.tensor([1e3, 1.0, 1e-3, 10.0], dtype=F64)[:, None]
    near_parallel = torch.stack([g[0], g[0] + 1e-3 * g[1], -g[0] + 0.3 * g[3]])
    return [opposed, scaled, near_parallel]


CASES = [conflicting(t, seed=t) for t in (2, 3, 5, 10)] + adversarial()


# ------------------------------------------------------------------------- ConFIG
@pytest.mark.parametrize("jacobian", CASES, ids=range(len(CASES)))
def test_config_projects_equally_onto_every_unit_gradient(jacobian: Tensor) -> None:
    """Full-rank rows: d . u_t is the same positive number for every task, and ||d|| is
    the sum of the tasks' projections onto d's direction."""
    d = make("config", jacobian.shape[0])(jacobian)
    units = jacobian / jacobian.norm(dim=1, keepdim=True)
    projections = units @ d
    assert projections.min() > 0
    assert torch.allclose(projections, projections.mean().expand_as(projections), rtol=1e-6)
    assert (d @ d).item() == pytest.approx((jacobian @ d).sum().item(), rel=1e-9)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("num_tasks", [1, 2, 3, 5])
def test_config_matches_torchjd(num_tasks: int, seed: int) -> None:
    """torchjd's ConFIG (unit preference vector) is on the same scale."""
    jacobian = conflicting(num_tasks, 15, seed=100 + seed)
    ours = make("config", num_tasks)(jacobian)
    assert torch.allclose(ours, aggregation.ConFIG()(jacobian), rtol=1e-9, atol=1e-12)


def test_config_matches_torchjd_with_more_tasks_than_dimensions() -> None:
    """Rank-deficient rows: no x has u_t . x = 1 for all t; both take the least-squares
    solution of the pseudo-inverse."""
    for seed in range(3):
        jacobian = rows(6, 3, seed=150 + seed)
        assert torch.allclose(make("config", 6)(jacobian), aggregation.ConFIG()(jacobian), rtol=1e-9, atol=1e-12)


def test_config_leaves_a_zero_row_out_and_cancels_on_opposite_rows() -> None:
    g = rows(3, 10, seed=5)
    with_zero = g.clone()
    with_zero[1] = 0
    assert torch.allclose(make("config", 3)(with_zero), make("config", 2)(g[[0, 2]]))
    opposite = make("config", 2)(torch.stack([g[0], -3 * g[0]]))
    assert torch.all(opposite == 0)
    agreeing = torch.stack([g[0], 2 * g[0], 0.5 * g[0]])
    assert torch.allclose(make("config", 3)(agreeing), agreeing.sum(0))


# ----------------------------------------------------------------------- DualProj
@pytest.mark.parametrize("jacobian", CASES, ids=range(len(CASES)))
def test_dualproj_is_the_closest_conflict_free_point_to_the_sum(jacobian: Tensor) -> None:
    """KKT conditions of projecting J^T 1 onto {x : J x >= 0}: d = J^T v with v >= 1
    (multipliers v - 1 >= 0), J d >= 0, and (v_t - 1) (g_t . d) = 0."""
    surgery = make("dualproj", jacobian.shape[0])
    d = surgery(jacobian)
    v = surgery.last_weights
    assert v is not None and torch.allclose(d, v @ jacobian)
    scale = d.norm() * jacobian.norm(dim=1)
    products = jacobian @ d
    assert torch.all(v >= 1 - 1e-9)
    assert torch.all(products >= -1e-7 * scale)
    assert torch.all(((v - 1) * products).abs() <= 1e-7 * scale * v)


def test_dualproj_without_conflict_is_the_sum() -> None:
    jacobian = rows(4, 20, seed=3).abs()
    assert torch.allclose(make("dualproj", 4)(jacobian), jacobian.sum(0))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("num_tasks", [2, 3, 5])
def test_dualproj_matches_torchjd(num_tasks: int, seed: int) -> None:
    """torchjd projects the mean: T times its direction."""
    from torchjd._linalg._dual_cone import QuadprogProjector

    jacobian = conflicting(num_tasks, 15, seed=200 + seed)
    theirs = aggregation.DualProj(projector=QuadprogProjector(reg_eps=0.0))(jacobian) * num_tasks
    assert torch.allclose(make("dualproj", num_tasks)(jacobian), theirs, rtol=1e-6, atol=1e-9)


# ----------------------------------------------------------------------- FairGrad
@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("jacobian", CASES, ids=range(len(CASES)))
def test_fairgrad_solves_the_fixed_point_equation(jacobian: Tensor, alpha: float) -> None:
    """M w = w^(-1/alpha) with w > 0, and d = w @ J."""
    surgery = make("fairgrad", jacobian.shape[0], alpha=alpha, optim_niter=60)
    d = surgery(jacobian)
    w = surgery.last_weights
    assert w is not None and torch.all(w > 0)
    target = w.pow(-1 / alpha)
    assert torch.allclose(jacobian @ jacobian.T @ w, target, rtol=1e-7)
    assert torch.allclose(d, w @ jacobian)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("num_tasks", [2, 3, 5])
def test_fairgrad_matches_torchjd(num_tasks: int, alpha: float) -> None:
    pytest.importorskip("scipy")
    jacobian = conflicting(num_tasks, 15, seed=300 + num_tasks)
    theirs = aggregation.FairGrad(alpha=alpha)(jacobian)
    assert torch.allclose(make("fairgrad", num_tasks, alpha=alpha)(jacobian), theirs, rtol=1e-6)


def test_fairgrad_with_alpha_one_is_nash_mtl_and_handles_zero_rows() -> None:
    jacobian = conflicting(4, 20, seed=9)
    nash = make("nash_mtl", 4, max_norm=0.0)(jacobian)
    assert torch.allclose(make("fairgrad", 4, alpha=1.0)(jacobian), nash, rtol=1e-9)
    with_zero = jacobian.clone()
    with_zero[2] = 0
    surgery = make("fairgrad", 4)
    d = surgery(with_zero)
    assert surgery.last_weights is not None and surgery.last_weights[2] == 0
    assert torch.allclose(d, make("fairgrad", 3)(jacobian[[0, 1, 3]]))


def test_fairgrad_warm_start_and_early_stop_keep_the_solution(monkeypatch: pytest.MonkeyPatch) -> None:
    """A warm-started solve lands on the cold solve's answer; on the CPU the loop stops
    once w has settled, with the full loop's result up to float64 round-off."""
    jacobian = conflicting(5, 20, seed=10)
    surgery = make("fairgrad", 5)
    cold = surgery(jacobian)
    assert torch.allclose(surgery(jacobian), cold, rtol=1e-12)
    nudged = jacobian + 1e-2 * rows(5, 20, seed=11)
    warm = surgery(nudged)
    assert torch.allclose(warm, make("fairgrad", 5)(nudged), rtol=1e-9)
    early = make("fairgrad", 5, optim_niter=60)(nudged)
    monkeypatch.setattr(fairgrad, "host_resident", lambda tensor: False)
    assert torch.allclose(make("fairgrad", 5, optim_niter=60)(nudged), early, rtol=1e-12, atol=0)


# ------------------------------------------------------------------------ SDMGrad
@pytest.mark.parametrize("lr", [1.0, 10.0])
@pytest.mark.parametrize("num_tasks", [2, 3, 5])
def test_sdmgrad_matches_torchjd_over_steps(num_tasks: int, lr: float) -> None:
    """Fed the same (single-batch) Gramian, torchjd's stateful SDMGradWeighting gives
    convex weights T times smaller, step after step (both warm-start w)."""
    ours = make("sdmgrad", num_tasks, lr=lr)
    theirs = aggregation.SDMGradWeighting(lr=lr)
    for step in range(4):
        jacobian = conflicting(num_tasks, 20, seed=400 + step)
        ours(jacobian)
        assert ours.last_weights is not None
        assert torch.allclose(ours.last_weights, num_tasks * theirs(jacobian @ jacobian.T), rtol=1e-5, atol=1e-8)


def test_sdmgrad_interpolates_between_mgda_and_the_mean() -> None:
    """lamda = 0 with enough inner steps: MGDA's min-norm point; a huge lamda: the sum."""
    jacobian = conflicting(3, 20, seed=12)
    converged = make("sdmgrad", 3, lamda=0.0, lr=0.2, momentum=0.0, niter=3000)(jacobian)
    mgda = 3 * simplex.min_norm_weights(jacobian @ jacobian.T) @ jacobian
    assert torch.allclose(converged, mgda, rtol=1e-6, atol=1e-8)
    assert torch.allclose(make("sdmgrad", 3, lamda=1e9)(jacobian), jacobian.sum(0), rtol=1e-6)


# --------------------------------------------------------------------------- MoDo
def test_modo_takes_one_projected_step_per_call() -> None:
    """By hand: lambda <- Proj(lambda - gamma (M + rho I) lambda), d = T lambda @ J."""
    gamma, rho = 0.05, 0.2
    surgery = make("modo", 3, gamma=gamma, rho=rho)
    weights = torch.full((3,), 1 / 3, dtype=F64)
    for step in range(3):
        jacobian = conflicting(3, 8, seed=500 + step)
        weights = simplex.project_onto_simplex(weights - gamma * (jacobian @ jacobian.T @ weights + rho * weights))
        assert torch.allclose(surgery(jacobian), 3 * weights @ jacobian, rtol=1e-12)


@pytest.mark.parametrize("num_tasks", [2, 3, 5])
def test_modo_matches_torchjd_over_steps(num_tasks: int) -> None:
    ours = make("modo", num_tasks)
    theirs = aggregation.MoDoWeighting()
    for step in range(4):
        jacobian = 0.3 * conflicting(num_tasks, 20, seed=600 + step)
        ours(jacobian)
        assert ours.last_weights is not None
        assert torch.allclose(ours.last_weights, num_tasks * theirs(jacobian @ jacobian.T), atol=1e-7)


# --------------------------------------------------------------------------- MoCo
def test_moco_tracks_gradients_and_updates_lambda_by_hand() -> None:
    beta, gamma, rho = 0.5, 0.1, 0.05
    surgery = make("moco", 3, rho=rho)
    tracked, weights = None, torch.full((3,), 1 / 3, dtype=F64)
    for k in range(1, 5):
        jacobian = 0.3 * conflicting(3, 8, seed=700 + k)
        tracked = jacobian if tracked is None else tracked - beta / k**0.5 * (tracked - jacobian)
        step = gamma / k**0.5
        weights = simplex.project_onto_simplex(weights - step * (tracked @ tracked.T @ weights + rho * weights))
        assert torch.allclose(surgery(jacobian), 3 * weights @ tracked, rtol=1e-12)
    assert isinstance(surgery, MoCo) and surgery.step == 4


def test_moco_with_a_fixed_jacobian_approaches_mgda() -> None:
    """Noise-free gradients: Y = J, and lambda's projected steps minimise lambda^T M lambda."""
    jacobian = 0.2 * conflicting(3, 10, seed=13)
    surgery = make("moco", 3, gamma_sigma=0.0)  # a constant step: linear convergence
    for _ in range(500):
        d = surgery(jacobian)
    mgda = 3 * simplex.min_norm_weights(jacobian @ jacobian.T) @ jacobian
    assert torch.allclose(d, mgda, rtol=1e-3, atol=1e-5)


def test_moco_loss_norm_rescales_rows_to_their_losses() -> None:
    """gradient_norm=loss tracks L_t g_t / ||g_t|| instead of g_t (a zero row stays 0)."""
    jacobian = conflicting(3, 8, seed=14)
    jacobian[2] = 0
    losses = torch.tensor([0.5, 2.0, 1.0], dtype=F64)
    rescaled = jacobian * (losses / jacobian.norm(dim=1).clamp_min(1e-300))[:, None]
    normed, raw = make("moco", 3, gradient_norm="loss"), make("moco", 3)
    for _ in range(3):
        assert torch.allclose(normed(jacobian, losses), raw(rescaled), rtol=1e-12)
    assert isinstance(normed, MoCo) and normed.tracked is not None
    assert torch.allclose(normed.tracked.norm(dim=1), torch.tensor([0.5, 2.0, 0.0], dtype=F64))
    with pytest.raises(ValueError, match="needs the task losses"):
        make("moco", 3, gradient_norm="loss")(jacobian)


def test_moco_refuses_the_features_space() -> None:
    with pytest.raises(ValueError, match="space=params"):
        MoCo(space="features")


# ---------------------------------------------------------------------- ExcessMTL
def test_excess_mtl_weights_by_hand() -> None:
    """S += g^2; e_t = sum g^2 / sqrt(S); first step sets the baseline (uniform weights);
    then alpha <- alpha exp(step e / e0), normalised; d = T alpha @ J."""
    step_size = 0.7
    surgery = make("excess_mtl", 3, robust_step_size=step_size)
    squares, baseline, alpha = torch.zeros(3, 6, dtype=F64), None, torch.full((3,), 1 / 3, dtype=F64)
    for step in range(4):
        jacobian = conflicting(3, 6, seed=800 + step) * torch.tensor([1.0, 3.0, 0.2], dtype=F64)[:, None]
        squares = squares + jacobian**2
        excess = (jacobian**2 / squares.sqrt()).sum(1)
        baseline = excess if baseline is None else baseline
        alpha = alpha * torch.exp(step_size * excess / baseline)
        alpha = alpha / alpha.sum()
        d = surgery(jacobian)
        assert torch.allclose(d, 3 * alpha @ jacobian, rtol=1e-10)
        if step == 0:
            assert torch.allclose(alpha, torch.full((3,), 1 / 3, dtype=F64))


@pytest.mark.parametrize("num_tasks", [2, 3, 5])
def test_excess_mtl_matches_torchjd_after_warmup(num_tasks: int) -> None:
    """With a warm-up both take the baseline from the same steps (torchjd's first
    un-warmed step uses the raw estimate, see the class docstring). Large gradients make
    torchjd's constant inside the square root negligible."""
    ours = make("excess_mtl", num_tasks, n_warmup_steps=2)
    theirs = aggregation.ExcessMTL(n_warmup_steps=2)
    for step in range(6):
        jacobian = 1e3 * conflicting(num_tasks, 20, seed=900 + step) * torch.rand(num_tasks, 1, generator=seeded(step), dtype=F64)
        assert torch.allclose(ours(jacobian), num_tasks * theirs(jacobian), rtol=1e-6)


def test_excess_mtl_favours_the_task_with_growing_excess() -> None:
    surgery = make("excess_mtl", 2, robust_step_size=0.5)
    for step in range(5):
        jacobian = rows(2, 10, seed=step) * torch.tensor([[1.0], [1.0 + step]], dtype=F64)
        surgery(jacobian)
    assert surgery.last_weights is not None and surgery.last_weights[1] > 1 > surgery.last_weights[0]
    assert surgery.last_weights.sum().item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="space=params"):
        ExcessMTL(space="features")


# ------------------------------------------------------------- shared behaviour
@pytest.mark.parametrize("name", NEW)
def test_nonfinite_rows_are_dropped(name: str) -> None:
    """A row with a NaN or inf counts as a zero row this step (weight 0; moco weights
    its tracked rows, and a task's tracked row outlives one bad step), for fresh state."""
    jacobian = conflicting(3, 7, seed=40)
    for bad in (float("nan"), float("inf")):
        broken, zeroed = jacobian.clone(), jacobian.clone()
        broken[1, 2] = bad
        zeroed[1] = 0
        surgery = make(name, 3)
        d = surgery(broken)
        assert torch.allclose(d, make(name, 3)(zeroed), rtol=1e-9, atol=1e-12), name
        assert surgery.last_weights is not None and (name == "moco" or surgery.last_weights[1] == 0)
    if name in GRAMIAN:
        gramian_surgery = make(name, 3)
        assert isinstance(gramian_surgery, GramianWeighting)
        w = gramian_surgery.weights(broken @ broken.T)
        assert torch.all(torch.isfinite(w)) and w[1] == 0


@pytest.mark.parametrize("name", ["config", "dualproj", "fairgrad", "sdmgrad"])
@pytest.mark.parametrize("scale", [1e-6, 1e6])
def test_scale_free_methods_are_positively_homogeneous(name: str, scale: float) -> None:
    """Tiny late-training gradients (float32) must not meet an absolute tolerance.
    fairgrad: w scales as ||g||^(-2 alpha / (alpha + 1)), so d as scale^((1 - alpha) / (1 + alpha))."""
    jacobian = adversarial()[0].float()
    d = make(name, 3)(jacobian)
    power = (1 - 2.0) / (1 + 2.0) if name == "fairgrad" else 1.0
    expected = scale**power * d
    assert torch.allclose(make(name, 3)(scale * jacobian), expected, rtol=1e-3, atol=1e-3 * expected.norm())


@pytest.mark.parametrize("name", STATEFUL)
def test_state_dict_round_trip_gives_identical_next_outputs(name: str) -> None:
    first = make(name, 4, seed=3)
    for step in range(3):
        first(conflicting(4, 25, seed=step))
    state = first.state_dict()
    expected = [first(conflicting(4, 25, seed=10 + k)) for k in range(3)]
    second = make(name, 4, seed=99)
    second.load_state_dict(state)
    got = [second(conflicting(4, 25, seed=10 + k)) for k in range(3)]
    for a, b in zip(expected, got):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("name", NEW)
def test_no_host_sync_per_step(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """As in test_surgery.py: tensors made to look device-resident, every host read fails."""
    jacobian = conflicting(4, 10, seed=50).float()
    surgery = make(name, 4)
    surgery(jacobian, torch.ones(4))

    with refusing_host_reads(monkeypatch, f"surgery={name}", [simplex, fairgrad]):
        surgery(jacobian, torch.ones(4))


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["surgery=fairgrad", "surgery.alpha=0"], "surgery.alpha"),
        (["surgery=sdmgrad", "surgery.momentum=1.0"], "surgery.momentum"),
        (["surgery=modo", "surgery.gamma=-0.1"], "surgery.gamma"),
        (["surgery=moco", "surgery.beta=1.5"], "surgery.beta"),
        (["surgery=moco", "surgery.gradient_norm=l2"], "surgery.gradient_norm"),
        (["surgery=excess_mtl", "surgery.n_warmup_steps=-1"], "surgery.n_warmup_steps"),
        (["surgery=moco", "surgery.space=features"], "space=params"),
    ],
)
def test_bad_options_are_config_errors(overrides: list[str], fragment: str) -> None:
    cfg = compose_config(overrides)
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        validate(cfg)
        build.build_surgery(cfg)


# -------------------------------------------------------------------- end to end
@pytest.mark.parametrize("name", NEW)
def test_each_method_trains_end_to_end(tmp_path: Path, one_thread: None, name: str) -> None:
    """Row weightings alternate between the two spaces; moco and excess_mtl need J."""
    space = "features" if name in ("config", "fairgrad", "modo") else "params"
    cfg = compose_config([*TINY, f"surgery={name}", f"surgery.space={space}", *SMALLER, "diagnostics.every_n_steps=0"])
    run_experiment(cfg, tmp_path / name)
    results = json.loads((tmp_path / name / "results.json").read_text())
    assert results["status"] == "completed", name


@pytest.mark.parametrize("name", ["moco", "excess_mtl", "sdmgrad"])
def test_resume_continues_the_state_exactly(tmp_path: Path, one_thread: None, name: str) -> None:
    """One epoch, then resume for a second: the same results as two epochs straight
    (moco and excess_mtl keep T x P tensors, sdmgrad the warm-started weights)."""
    base = [*TINY, f"surgery={name}", *SMALLER, "trainer.lr_schedule=constant", "diagnostics.every_n_steps=0"]
    reference = run_experiment(compose_config([*base, "trainer.epochs=2"]), tmp_path / "reference")
    run_experiment(compose_config([*base, "trainer.epochs=1"]), tmp_path / "split")
    resumed = run_experiment(compose_config([*base, "trainer.epochs=2", f"resume={tmp_path / 'split'}"]), tmp_path / "split")
    assert resumed["resumed"] is True
    assert resumed["tasks"] == reference["tasks"]
