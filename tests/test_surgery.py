"""Row-weighting surgery methods: each paper's defining property on random and adversarial
Jacobians, cross-checks against torchjd, degenerate inputs for every YAML in conf/surgery/,
the features space, no host synchronisation, and short end-to-end runs."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor

from mtl_runner import build
from mtl_runner.cli import CONF_DIR
from mtl_runner.config import ConfigError, validate
from mtl_runner.data.synthetic_scenes import synthetic_scenes
from mtl_runner.models.backbones import SmallCNN
from mtl_runner.models.sharing.hard import HardSharing
from mtl_runner.optim.balancers.uniform import Uniform
from mtl_runner.optim.jacobian import GradientEngine
from mtl_runner.optim.surgery import nash_mtl, simplex
from mtl_runner.optim.surgery.aligned_mtl import AlignedMTL
from mtl_runner.optim.surgery.base import GramianWeighting, Surgery
from mtl_runner.optim.surgery.cagrad import CAGrad
from mtl_runner.optim.surgery.imtl_g import IMTLG
from mtl_runner.optim.surgery.mgda import MGDA
from mtl_runner.optim.surgery.upgrad import UPGrad
from mtl_runner.runner import run_experiment
from tests.conftest import TINY, compose_config, refusing_host_reads

MINE = ["pcgrad", "mgda", "cagrad", "imtl_g", "upgrad", "aligned_mtl"]
ALL_YAMLS = sorted(p.stem for p in (CONF_DIR / "surgery").glob("*.yaml"))
F64 = torch.float64
#: Two training steps on 16 x 16 images: these runs only check that the plumbing works.
SMALLER = ["dataset.num_train=16", "dataset.num_val=8", "dataset.num_test=8", "dataset.image_size=16", "trainer.batch_size=8"]


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make(name: str, num_tasks: int, seed: int = 0) -> Surgery:
    surgery = instantiate(OmegaConf.load(CONF_DIR / "surgery" / f"{name}.yaml"))
    surgery.setup(num_tasks, seeded(seed))
    return surgery


def random_jacobian(num_tasks: int, dim: int = 20, seed: int = 0) -> Tensor:
    return torch.randn(num_tasks, dim, generator=seeded(seed), dtype=F64)


def adversarial_jacobians() -> list[Tensor]:
    """Strong conflicts, wildly different norms, near-parallel rows, more tasks than
    dimensions (rank deficient)."""
    g = random_jacobian(4, 12, seed=11)
    opposed = torch.stack([g[0], -0.9 * g[0] + 0.05 * g[1], g[2]])
    scales = random_jacobian(4, 12, seed=12) * torch.tensor([1e3, 1.0, 1e-3, 10.0], dtype=F64)[:, None]
    near_parallel = torch.stack([g[0], g[0] + 1e-4 * g[1], -g[0] + 0.3 * g[3]])
    wide = random_jacobian(6, 3, seed=13)
    return [opposed, scales, near_parallel, wide]


CASES = [random_jacobian(t, seed=t) for t in (2, 3, 5)] + adversarial_jacobians()


def qp_min_norm(gramian: Tensor) -> Tensor:
    """Independent reference: the host QP solver quadprog (Goldfarb-Idnani) on
    ``min w^T M w`` over the simplex, with a negligible ridge for singular Gramians."""
    quadprog = pytest.importorskip("quadprog")
    size = gramian.shape[0]
    m = (gramian + 1e-12 * gramian.trace() * torch.eye(size, dtype=F64)).numpy()
    constraints = torch.cat([torch.ones(size, 1, dtype=F64), torch.eye(size, dtype=F64)], 1).numpy()
    bounds = torch.cat([torch.ones(1, dtype=F64), torch.zeros(size, dtype=F64)]).numpy()
    solution = quadprog.solve_qp(m, torch.zeros(size, dtype=F64).numpy(), constraints, bounds, 1)[0]
    return torch.as_tensor(solution, dtype=F64)


# ------------------------------------------------------------------ the T-dim solvers
def test_simplex_projection_is_the_closest_point() -> None:
    v = torch.randn(50, 6, generator=seeded(1), dtype=F64) * 3
    p = simplex.project_onto_simplex(v)
    assert torch.all(p >= 0) and torch.allclose(p.sum(-1), torch.ones(50, dtype=F64))
    others = simplex.project_onto_simplex(p + 0.1 * torch.randn(50, 6, generator=seeded(2), dtype=F64))
    assert torch.all((v - p).norm(dim=-1) <= (v - others).norm(dim=-1) + 1e-12)


@pytest.mark.parametrize("jacobian", CASES, ids=range(len(CASES)))
def test_min_norm_weights_match_a_projected_gradient_reference(jacobian: Tensor) -> None:
    gramian = jacobian @ jacobian.T
    w = simplex.min_norm_weights(gramian)
    reference = qp_min_norm(gramian)
    assert torch.all(w >= 0) and w.sum() == pytest.approx(1.0)
    assert w @ gramian @ w <= reference @ gramian @ reference * (1 + 1e-9) + 1e-12
    assert torch.allclose(w @ jacobian, reference @ jacobian, atol=1e-5 * jacobian.norm())


def test_large_problems_pivot_to_the_exact_optimum_on_the_cpu() -> None:
    """Beyond MAX_EXACT_TASKS the CPU solve pivots from a cold start (no enumeration to
    fall back on): it reaches the reference optimum to float64 precision, where the
    fixed-iteration fallback only approximates it."""
    jacobian = random_jacobian(3 * simplex.MAX_EXACT_TASKS, 80, seed=5)
    gramian = jacobian @ jacobian.T
    w = simplex.min_norm_weights(gramian)
    reference = qp_min_norm(gramian)
    assert (w @ gramian @ w).item() == pytest.approx((reference @ gramian @ reference).item(), rel=1e-9)
    identity = torch.eye(gramian.shape[0], dtype=gramian.dtype)
    v = simplex.dual_cone_weights(gramian, identity)
    assert torch.all(v >= identity - 1e-12)
    multipliers = v @ gramian  # KKT: non-negative, zero where v is above its bound
    assert torch.all(multipliers >= -1e-9 * gramian.abs().max())
    assert torch.all((v - identity).abs() * multipliers.abs() <= 1e-9 * gramian.abs().max())


def test_projected_gradient_fallback_beyond_exact_size() -> None:
    """T > MAX_EXACT_TASKS: the pivoting on the CPU (the fixed-iteration fallback for
    rows that do not settle): same answer on a well-conditioned problem."""
    jacobian = random_jacobian(simplex.MAX_EXACT_TASKS + 2, 40, seed=3)
    gramian = jacobian @ jacobian.T
    w = simplex.min_norm_weights(gramian)
    reference = qp_min_norm(gramian)
    assert (w @ gramian @ w) == pytest.approx((reference @ gramian @ reference).item(), rel=1e-4)
    d = UPGrad()(jacobian)
    assert torch.all(jacobian @ d >= -1e-6 * d.norm() * jacobian.norm(dim=1))
    c = 0.4
    d = CAGrad(c=c, rescale=0)(jacobian) / jacobian.shape[0]
    g0 = jacobian.mean(0)
    assert (d - g0).norm() <= c * g0.norm() * (1 + 1e-6)
    assert (jacobian @ d).min() >= (jacobian @ g0).min()


WARM_CASES = [random_jacobian(10, 40, seed=7), random_jacobian(10, 6, seed=8)] + adversarial_jacobians()


def _hints(num_tasks: int, shape: tuple[int, ...], right: Tensor) -> list[Tensor]:
    """The right support, and wrong ones: all free, none free, a random one."""
    random = torch.rand(shape, generator=seeded(num_tasks)) < 0.5
    return [right, torch.ones(shape, dtype=torch.bool), torch.zeros(shape, dtype=torch.bool), random]


@pytest.mark.parametrize("jacobian", WARM_CASES, ids=range(len(WARM_CASES)))
def test_hinted_solves_give_the_enumerations_answer(jacobian: Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU shortcut (try last step's support, keep it if the KKT conditions hold)
    returns what the enumeration returns, whether the hint is right or wrong; a right
    hint skips the enumeration."""
    gramian = jacobian @ jacobian.T
    size = gramian.shape[0]
    identity = torch.eye(size, dtype=F64)
    radius = 0.4 * gramian.mean().clamp_min(0).sqrt()
    exact = {
        "min_norm": simplex.min_norm_weights(gramian),
        "dual_cone": simplex.dual_cone_weights(gramian, identity),
        "cagrad": simplex.cagrad_weights(gramian, radius),
    }
    solve = {
        "min_norm": lambda hint: simplex.min_norm_weights(gramian, hint),
        "dual_cone": lambda hint: simplex.dual_cone_weights(gramian, identity, hint),
        "cagrad": lambda hint: simplex.cagrad_weights(gramian, radius, hint),
    }
    lower = {"min_norm": 0.0, "dual_cone": identity, "cagrad": 0.0}
    for name, answer in exact.items():
        right = simplex.support_of(answer, lower[name])
        for hint in _hints(size, tuple(right.shape), right):
            # Directions, not weights: with a singular Gramian the weights are not unique.
            assert torch.allclose(solve[name](hint) @ jacobian, answer @ jacobian, rtol=1e-7, atol=1e-9 * jacobian.norm()), name

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the hint was the optimum's support, yet the solver enumerated")

    monkeypatch.setattr(simplex, "supports", refuse)
    for name, answer in exact.items():
        right = simplex.support_of(answer, lower[name])
        if name == "cagrad" and not bool((answer @ gramian @ answer) > 0):
            continue  # g_w = 0: only the enumeration's min-norm candidates cover it
        assert torch.allclose(solve[name](right) @ jacobian, answer @ jacobian, rtol=1e-7, atol=1e-9 * jacobian.norm()), name


@pytest.mark.parametrize("name", ["mgda", "upgrad", "cagrad"])
def test_hints_are_kept_across_steps_and_in_checkpoints(name: str) -> None:
    """A surgery remembers its last support; a fresh instance (no hint) and one restored
    from the state dict agree with it on the next, slightly different, Jacobian."""
    jacobian = random_jacobian(6, 30, seed=21)
    surgery = make(name, 6)
    surgery(jacobian)
    assert isinstance(surgery, GramianWeighting) and surgery.support is not None
    restored = make(name, 6)
    restored.load_state_dict(surgery.state_dict())
    assert torch.equal(restored.support, surgery.support)
    nudged = jacobian + 1e-3 * random_jacobian(6, 30, seed=22)
    direction = surgery(nudged)
    assert torch.allclose(direction, make(name, 6)(nudged), rtol=1e-7, atol=1e-9)
    assert torch.equal(restored(nudged), direction)


# ------------------------------------------------------------------------- pcgrad
@pytest.mark.parametrize("seed", range(5))
def test_pcgrad_two_tasks_leaves_no_conflict(seed: int) -> None:
    g = random_jacobian(2, 10, seed=seed)
    g[1] = -0.7 * g[0] + 0.5 * g[1]  # a conflict
    assert g[0] @ g[1] < 0
    d = make("pcgrad", 2)(g)
    g0 = g[0] - (g[0] @ g[1]) / (g[1] @ g[1]) * g[1]
    g1 = g[1] - (g[1] @ g[0]) / (g[0] @ g[0]) * g[0]
    assert g0 @ g[1] == pytest.approx(0.0, abs=1e-10) and g1 @ g[0] == pytest.approx(0.0, abs=1e-10)
    assert torch.allclose(d, g0 + g1)
    assert torch.all(g @ d >= -1e-10)


def test_pcgrad_leaves_agreeing_gradients_alone_and_follows_the_seed() -> None:
    g = random_jacobian(3, 10, seed=4).abs()  # all pairwise products positive
    assert torch.allclose(make("pcgrad", 3)(g), g.sum(0))
    conflicted = random_jacobian(5, 4, seed=5)
    assert torch.equal(make("pcgrad", 5, 0)(conflicted), make("pcgrad", 5, 0)(conflicted))
    orders = {tuple(make("pcgrad", 5, s).orders_of_others(5, torch.device("cpu"))[0].tolist()) for s in range(20)}
    assert len(orders) > 1 and all(0 not in o and len(set(o)) == 4 for o in orders)


def test_pcgrad_matches_a_direct_projection_loop() -> None:
    """Coefficient tracking in the Gramian equals projecting the vectors themselves in
    the same random orders."""
    g = random_jacobian(4, 6, seed=6)
    surgery = make("pcgrad", 4, seed=3)
    orders = surgery.orders_of_others(4, torch.device("cpu"))
    surgery = make("pcgrad", 4, seed=3)
    d = surgery(g)
    expected = torch.zeros(6, dtype=F64)
    for i in range(4):
        gi = g[i].clone()
        for j in orders[i].tolist():
            if gi @ g[j] < 0:
                gi -= (gi @ g[j]) / (g[j] @ g[j]) * g[j]
        expected += gi
    assert torch.allclose(d, expected)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_pcgrad_many_tasks_equal_one_round_at_a_time_bit_for_bit(dtype: torch.dtype) -> None:
    """The solve gathers what its rounds read up front; its weights equal those of
    projecting one round at a time, with every comparison and division in the loop
    (zero rows and exact opposites included), in float32 and float64."""
    num_tasks = 40
    g = random_jacobian(num_tasks, 60, seed=8).to(dtype)
    g[3] = 0
    g[5] = -g[0]
    gramian = g @ g.T
    orders = make("pcgrad", num_tasks, seed=2).orders_of_others(num_tasks, torch.device("cpu"))
    coefficients = torch.eye(num_tasks, dtype=dtype)
    rows = torch.arange(num_tasks)
    for k in range(num_tasks - 1):
        j = orders[:, k]
        inner = (coefficients * gramian[j]).sum(1)
        conflict = (inner < 0) & (gramian[j, j] > 0)
        shift = torch.where(conflict, inner / torch.where(conflict, gramian[j, j], 1), 0)
        coefficients[rows, j] -= shift
    assert torch.equal(make("pcgrad", num_tasks, seed=2).weights(gramian), coefficients.sum(0))


# --------------------------------------------------------------------------- mgda
@pytest.mark.parametrize("jacobian", CASES, ids=range(len(CASES)))
def test_mgda_direction_is_the_scaled_min_norm_point(jacobian: Tensor) -> None:
    num_tasks = jacobian.shape[0]
    d = MGDA()(jacobian)
    point = d / num_tasks  # the paper's convex combination
    # Optimality of the minimum-norm point x of the hull: x . g_t >= ||x||^2 for all t.
    assert torch.all(jacobian @ point >= point @ point - 1e-9 * jacobian.norm() ** 2)
    reference = qp_min_norm(jacobian @ jacobian.T) @ jacobian
    assert torch.allclose(point, reference, atol=1e-5 * jacobian.norm())


def test_mgda_normalizations_are_invariant_to_what_they_normalize() -> None:
    g = random_jacobian(3, 8, seed=8)
    scaled = g * torch.tensor([10.0, 1.0, 0.1], dtype=F64)[:, None]
    gram, gram_scaled = g @ g.T, scaled @ scaled.T
    losses = torch.tensor([1.0, 2.0, 3.0], dtype=F64)
    l2 = MGDA(normalization="l2")
    assert torch.allclose(l2.weights(gram), l2.weights(gram_scaled))
    by_loss = MGDA(normalization="loss")
    factors = torch.tensor([10.0, 1.0, 0.1], dtype=F64)
    assert torch.allclose(by_loss.weights(gram, losses), by_loss.weights(gram_scaled, losses * factors))
    both = MGDA(normalization="loss+")
    assert torch.allclose(both.weights(gram, losses), both.weights(gram_scaled, 3 * losses))
    with pytest.raises(ValueError, match="losses"):
        by_loss.weights(gram)


# ------------------------------------------------------------------------- cagrad
@pytest.mark.parametrize("jacobian", CASES, ids=range(len(CASES)))
def test_cagrad_zero_c_is_the_sum(jacobian: Tensor) -> None:
    assert torch.allclose(CAGrad(c=0.0)(jacobian), jacobian.sum(0))


@pytest.mark.parametrize("jacobian", CASES, ids=range(len(CASES)))
@pytest.mark.parametrize("c", [0.4, 0.9])
def test_cagrad_maximises_the_worst_task_in_the_ball(jacobian: Tensor, c: float) -> None:
    """CAGrad's primal (Liu et al. 2021, eq. 3): d maximises min_t g_t . d over
    ||d - g0|| <= c ||g0||; compare with many points of that ball."""
    num_tasks = jacobian.shape[0]
    d = CAGrad(c=c, rescale=0)(jacobian) / num_tasks  # the paper's mean-scale direction
    g0 = jacobian.mean(0)
    radius = c * g0.norm()
    assert (d - g0).norm() <= radius * (1 + 1e-6) + 1e-12
    directions = torch.randn(2000, jacobian.shape[1], generator=seeded(9), dtype=F64)
    lengths = torch.rand(2000, 1, generator=seeded(10), dtype=F64) ** 0.2
    ball = g0 + radius * lengths * directions / directions.norm(dim=1, keepdim=True)
    best_sampled = (ball @ jacobian.T).min(1).values.max()
    worst = (jacobian @ d).min()
    assert worst >= best_sampled - 1e-7 * jacobian.norm() ** 2
    assert worst >= (jacobian @ g0).min() - 1e-9 * jacobian.norm() ** 2


def test_cagrad_rescale_options() -> None:
    g = random_jacobian(3, 8, seed=14)
    raw = CAGrad(c=0.5, rescale=0)(g)
    assert torch.allclose(CAGrad(c=0.5, rescale=1)(g), raw / 1.25)
    assert torch.allclose(CAGrad(c=0.5, rescale=2)(g), raw / 1.5)
    for bad in ({"c": 1.0}, {"c": -0.1}, {"rescale": 3}):
        with pytest.raises(ValueError, match="surgery."):
            CAGrad(**bad)  # type: ignore[arg-type]


# ------------------------------------------------------------------------- upgrad
@pytest.mark.parametrize("jacobian", CASES, ids=range(len(CASES)))
def test_upgrad_never_opposes_a_task(jacobian: Tensor) -> None:
    d = UPGrad()(jacobian)
    assert torch.all(jacobian @ d >= -1e-9 * jacobian.norm() ** 2)


def test_upgrad_without_conflict_is_the_sum() -> None:
    g = random_jacobian(4, 10, seed=15).abs()
    assert torch.allclose(UPGrad()(g), g.sum(0))


# ------------------------------------------------------------------------- imtl_g
@pytest.mark.parametrize("jacobian", [random_jacobian(t, seed=20 + t) for t in (2, 3, 5)] + adversarial_jacobians()[:2])
def test_imtl_g_projects_equally_onto_every_unit_gradient(jacobian: Tensor) -> None:
    surgery = IMTLG()
    d = surgery(jacobian)
    units = jacobian / jacobian.norm(dim=1, keepdim=True)
    projections = units @ d
    assert torch.allclose(projections, projections.mean().expand_as(projections), rtol=1e-5)
    assert surgery.last_weights is not None and surgery.last_weights.sum() == pytest.approx(jacobian.shape[0])


def test_imtl_g_matches_the_papers_closed_form() -> None:
    g = random_jacobian(4, 9, seed=16)
    units = g / g.norm(dim=1, keepdim=True)
    differences, unit_differences = g[:1] - g[1:], units[:1] - units[1:]
    alpha_rest = g[0] @ unit_differences.T @ torch.linalg.inv(differences @ unit_differences.T)
    alpha = torch.cat([1 - alpha_rest.sum(0, keepdim=True), alpha_rest])
    assert torch.allclose(IMTLG()(g), 4 * alpha @ g)


# -------------------------------------------------------------------- aligned_mtl
@pytest.mark.parametrize("jacobian", [random_jacobian(t, seed=30 + t) for t in (2, 3, 5)] + adversarial_jacobians()[:2])
def test_aligned_mtl_rows_are_orthogonal_with_equal_norms(jacobian: Tensor) -> None:
    """Aligned gradients B J have condition number 1: Gram = lambda_min I (full rank)."""
    gramian = jacobian @ jacobian.T
    balance = AlignedMTL().balance_transformation(gramian)
    aligned = balance @ gramian @ balance.T
    smallest = torch.linalg.eigvalsh(gramian)[0]
    assert torch.allclose(aligned, smallest * torch.eye(len(gramian), dtype=F64), atol=1e-8 * gramian.norm())
    assert torch.allclose(AlignedMTL()(jacobian), (balance @ jacobian).sum(0))


def test_aligned_mtl_keeps_orthogonal_equal_norm_gradients() -> None:
    basis = torch.linalg.qr(random_jacobian(9, 3, seed=17))[0].T * 2.0
    assert torch.allclose(AlignedMTL()(basis), basis.sum(0))


# ------------------------------------------------------------------ torchjd oracle
def _torchjd(name: str, jacobian: Tensor) -> Tensor:
    aggregation = pytest.importorskip("torchjd.aggregation")
    if name == "upgrad":
        pytest.importorskip("quadprog")
        from torchjd._linalg._dual_cone import QuadprogProjector

        return aggregation.UPGrad(projector=QuadprogProjector(reg_eps=0.0))(jacobian)
    return {"mgda": aggregation.MGDA(), "imtl_g": aggregation.IMTLG(), "aligned_mtl": aggregation.AlignedMTL(),
            "pcgrad": aggregation.PCGrad()}[name](jacobian)


#: torchjd averages (mgda's, imtl_g's convex weights; upgrad and aligned_mtl average
#: their projected/aligned rows); the project sums. PCGrad sums in both.
TORCHJD_SCALE = {"mgda": "T", "imtl_g": "T", "upgrad": "T", "aligned_mtl": "T", "pcgrad": "1"}


@pytest.mark.parametrize("name", ["upgrad", "imtl_g", "aligned_mtl", "mgda", "pcgrad"])
@pytest.mark.parametrize("seed", range(3))
def test_matches_torchjd(name: str, seed: int) -> None:
    # torchjd's MGDA is Frank-Wolfe with early stopping: exact for T = 2 only (one line
    # search); PCGrad is random for T > 2.
    sizes = (2,) if name in ("mgda", "pcgrad") else (2, 3, 5)
    for num_tasks in sizes:
        jacobian = random_jacobian(num_tasks, 15, seed=100 + seed)
        if num_tasks == 2:
            jacobian[1] = -0.5 * jacobian[0] + jacobian[1]  # make the pair conflict
        ours = make(name, num_tasks)(jacobian)
        theirs = _torchjd(name, jacobian) * (num_tasks if TORCHJD_SCALE[name] == "T" else 1)
        assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5), (name, num_tasks)


@pytest.mark.parametrize("name", MINE)
@pytest.mark.parametrize("scale", [1e-6, 1e6])
def test_directions_scale_with_the_gradients(name: str, scale: float) -> None:
    """Every method is positively homogeneous: tiny late-training gradients (float32)
    must not be swamped by a solver's absolute tolerance or ridge."""
    jacobian = adversarial_jacobians()[0].float()
    d = make(name, 3)(jacobian)
    assert torch.allclose(make(name, 3)(scale * jacobian), scale * d, rtol=1e-3, atol=1e-3 * scale * d.norm())


# ------------------------------------------------------------- degenerate inputs
def _degenerate() -> dict[str, Tensor]:
    g = random_jacobian(3, 7, seed=40)
    zero_row = g.clone()
    zero_row[1] = 0
    nan_row, inf_row = g.clone(), g.clone()
    nan_row[1, 2] = float("nan")
    inf_row[0, 5] = float("inf")
    return {
        "one_task": g[:1].clone(),
        "zero_row": zero_row,
        "identical": g[:1].repeat(3, 1),
        "opposite": torch.stack([g[0], -g[0]]),
        "all_zero": torch.zeros(3, 7, dtype=F64),
        "nan_row": nan_row,
        "inf_row": inf_row,
    }


@pytest.mark.parametrize("name", ALL_YAMLS)
@pytest.mark.parametrize("case", list(_degenerate()))
def test_degenerate_inputs_give_finite_directions(name: str, case: str) -> None:
    jacobian = _degenerate()[case]
    num_tasks = jacobian.shape[0]
    losses = torch.ones(num_tasks, dtype=F64)
    surgery = make(name, num_tasks)
    for dtype in (F64, torch.float32):
        d = surgery(jacobian.to(dtype), losses.to(dtype))
        assert d.shape == (jacobian.shape[1],) and d.dtype == dtype
        assert torch.all(torch.isfinite(d)), (name, case, d)
    finite_rows = jacobian.nan_to_num(0.0, 0.0, 0.0)
    if case == "all_zero":
        assert torch.all(d == 0)
    if case in ("one_task", "identical"):
        g = jacobian[0]
        assert torch.nn.functional.cosine_similarity(d.double(), g, dim=0) > 1 - 1e-5
    if case in ("nan_row", "inf_row") and name in MINE:
        # Non-finite rows are dropped: the same as a zero row for that task.
        bad = ~torch.isfinite(jacobian).all(1)
        dropped = torch.where(bad[:, None], torch.zeros_like(finite_rows), jacobian)
        assert torch.allclose(surgery(jacobian, losses), make(name, num_tasks)(dropped, losses))
        assert surgery.last_weights is not None and torch.all(surgery.last_weights[bad] == 0)


@pytest.mark.parametrize("name", [n for n in MINE if n != "pcgrad"])
def test_weights_from_a_nonfinite_gramian_are_finite(name: str) -> None:
    """The features-space engine hands the Gramian straight to ``weights``."""
    jacobian = _degenerate()["nan_row"]
    surgery = make(name, 3)
    assert isinstance(surgery, GramianWeighting)
    w = surgery.weights(jacobian @ jacobian.T, torch.ones(3, dtype=F64))
    assert torch.all(torch.isfinite(w)) and w[1] == 0


def test_solve_sees_a_clean_gramian_and_dropped_tasks_weigh_zero() -> None:
    """The base class drops non-finite tasks once, for every subclass: ``solve`` gets
    their row and column zeroed, and whatever it returns for them becomes 0."""
    seen = []

    class NanForEveryone(GramianWeighting):
        def solve(self, gramian: torch.Tensor, losses: torch.Tensor | None = None) -> torch.Tensor:
            seen.append(gramian.clone())
            return torch.full((gramian.shape[0],), float("nan"), dtype=gramian.dtype).index_fill(0, torch.tensor([0, 2]), 1.0)

    jacobian = _degenerate()["nan_row"]
    surgery = NanForEveryone()
    d = surgery(jacobian)
    w = surgery.weights(jacobian @ jacobian.T)
    for gramian in seen:
        assert torch.all(torch.isfinite(gramian)) and torch.all(gramian[1] == 0) and torch.all(gramian[:, 1] == 0)
    assert torch.equal(w, torch.tensor([1.0, 0.0, 1.0], dtype=F64))
    assert torch.equal(surgery.last_weights, w)
    torch.testing.assert_close(d, jacobian[0] + jacobian[2])


# ------------------------------------------------------------- engine integration
@pytest.fixture(scope="module")
def scenes_batch():
    taskset = synthetic_scenes(image_size=16, num_train=8, num_val=1, num_test=1)
    x, y = next(taskset.train.batches(8, shuffle=False, generator=None, device=torch.device("cpu")))
    return taskset, x, y


def _engine_step(taskset, x, y, surgery: Surgery):
    torch.manual_seed(0)
    model = HardSharing(partial(SmallCNN, taskset.input_shape, (8, 8, 8, 8)), taskset.tasks, taskset.input_shape)
    model.eval()  # fixed BatchNorm statistics: every pass sees the same function
    balancer = Uniform()
    balancer.setup(taskset.tasks, None)
    surgery.setup(len(taskset.tasks), seeded(0))
    engine = GradientEngine(model, balancer, surgery, "sequential")
    out = engine.forward(x)
    losses = torch.stack([t.loss(out[t.name], y[t.name]) for t in taskset.tasks])
    engine.backward(losses, balancer.weights(losses))
    encoder = list(model.encoder.parameters())
    grads = torch.cat([p.grad.reshape(-1) for p in encoder])
    # Reference: per-task encoder gradients of a fresh forward of the same model.
    out = model(x)
    losses = torch.stack([t.loss(out[t.name], y[t.name]) for t in taskset.tasks])
    rows = torch.stack(
        [torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, encoder, retain_graph=True)]) for loss in losses]
    )
    return grads, rows


@pytest.mark.parametrize("name", MINE)
def test_params_and_features_spaces_apply_their_weights_to_the_encoder(scenes_batch, one_thread: None, name: str) -> None:
    taskset, x, y = scenes_batch
    params = make(name, 3)
    grads, rows = _engine_step(taskset, x, y, params)
    assert torch.allclose(grads, params.last_weights @ rows, rtol=1e-4, atol=1e-6)
    features = instantiate(OmegaConf.load(CONF_DIR / "surgery" / f"{name}.yaml"), space="features")
    grads, rows = _engine_step(taskset, x, y, features)
    # Weights come from the representation's Gramian and are applied to the encoder's rows.
    assert features.last_weights is not None and torch.all(torch.isfinite(features.last_weights))
    assert torch.allclose(grads, features.last_weights @ rows, rtol=1e-4, atol=1e-6)


def test_both_spaces_agree_where_the_weights_do(scenes_batch, one_thread: None) -> None:
    """cagrad with c = 0 weights every row 1 in either space: identical encoder update."""
    taskset, x, y = scenes_batch
    in_params, _ = _engine_step(taskset, x, y, CAGrad(c=0.0))
    in_features, _ = _engine_step(taskset, x, y, CAGrad(c=0.0, space="features"))
    assert torch.allclose(in_params, in_features, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", [*MINE, "gradvac", "nash_mtl"])
def test_no_host_sync_per_step(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU nothing is read back per step. Without one, the tensors are made to look
    device-resident (the solvers' CPU-only shortcuts read flags, which costs nothing on
    the CPU) and every host read fails the test."""
    jacobian = random_jacobian(4, 10, seed=50).float()
    losses = torch.ones(4)
    surgery = make(name, 4)
    surgery(jacobian, losses)  # warm caches (support masks) and hints

    with refusing_host_reads(monkeypatch, f"surgery={name}", [simplex, nash_mtl]):
        surgery(jacobian, losses)


# --------------------------------------------------------------- config and runs
@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["surgery=cagrad", "surgery.c=1.5"], "surgery.c"),  # a range: the constructor's check
        (["surgery=aligned_mtl", "surgery.scale_mode=mean"], "surgery.scale_mode"),  # a Literal: the schema's
    ],
)
def test_bad_options_are_config_errors(overrides: list[str], fragment: str) -> None:
    cfg = compose_config(overrides)
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        validate(cfg)
        build.build_surgery(cfg)


def test_every_method_trains_end_to_end(tmp_path: Path, one_thread: None) -> None:
    for index, name in enumerate(MINE):
        space = "features" if index % 2 else "params"  # both spaces, three methods each
        cfg = compose_config(
            [*TINY, f"surgery={name}", f"surgery.space={space}", *SMALLER, "trainer.jacobian=sequential", "diagnostics.every_n_steps=0"]
        )
        run_dir = tmp_path / name
        run_experiment(cfg, run_dir)
        results = json.loads((run_dir / "results.json").read_text())
        assert results["status"] == "completed", name
        accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
        accumulator.Reload()
        tags = set(accumulator.Tags()["scalars"])
        assert {"surgery_weight/seg", "surgery_weight/depth", "surgery_weight/count"} <= tags, (name, tags)
