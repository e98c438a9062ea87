"""Balancers: the properties users rely on, one paper property per method, plus the
contracts the engine relies on (finite non-negative weights, exact resume, Hydra configs).

``engine_step`` below drives a balancer exactly as the engine does (see the module
docstring of ``mtl_runner.optim.balancers.base``)."""

from __future__ import annotations

import inspect
import io
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import Tensor, nn

from mtl_runner.optim.balancers.base import Balancer, adam_step_
from mtl_runner.optim.balancers.dbmtl import DBMTL
from mtl_runner.optim.balancers.dwa import DWA
from mtl_runner.optim.balancers.geometric import Geometric
from mtl_runner.optim.balancers.gradnorm import GradNorm
from mtl_runner.optim.balancers.minmax import MinMax
from mtl_runner.optim.balancers.rlw import RLW
from mtl_runner.optim.balancers.static import Static
from mtl_runner.optim.balancers.uncertainty import Uncertainty
from mtl_runner.tasks import Task
from tests.conftest import conf_options

pytestmark = pytest.mark.usefixtures("one_thread")

CONF = Path(__file__).resolve().parents[1] / "conf" / "balancer"
NAMES = conf_options("balancer")
TASKS = (
    Task("seg", "segmentation", 13),
    Task("depth", "depth", 1),
    Task("count", "regression", 1),
)
T = len(TASKS)
P = 7  # width of the synthetic gradient rows


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make(name: str, seed: int = 0) -> Balancer:
    balancer = instantiate(OmegaConf.load(CONF / f"{name}.yaml"))
    balancer.setup(TASKS, generator(seed))
    return balancer


def engine_step(
    balancer: Balancer,
    losses: Tensor,
    jacobian: Tensor | None = None,
    recompute: Callable[[], Tensor] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """One training step as the engine drives it: weights -> rows -> after_step."""
    w = balancer.weights(losses)
    rows = None
    if balancer.requires_grads is not None:
        assert jacobian is not None
        rows = balancer.scale_rows(jacobian, losses, w)
    balancer.after_step(recompute if recompute is not None else (lambda: losses * 0.8))
    return w, rows


def loss_sequence(steps: int, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    """Losses spanning 1e-4..1e4 (plus an exact zero) and gradient rows of mixed scale."""
    g = generator(seed)
    out = []
    base = torch.tensor([1e-4, 1e4, 1.0])
    for k in range(steps):
        jitter = torch.exp(0.3 * torch.randn(T, generator=g))
        losses = base * jitter
        if k == 2:
            losses = torch.tensor([0.0, 1e4, 1e-4])
        rows = torch.randn(T, P, generator=g) * torch.tensor([[1e-3], [1e2], [1.0]])
        out.append((losses, rows))
    return out


# --------------------------------------------------------------------------- contracts


@pytest.mark.parametrize("name", NAMES)
def test_yaml_instantiates_with_every_constructor_argument(name: str) -> None:
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    balancer = instantiate(cfg)
    assert isinstance(balancer, Balancer)
    assert type(balancer).__module__ == f"mtl_runner.optim.balancers.{name}"
    params = inspect.signature(type(balancer).__init__).parameters
    args = {k: v for k, v in params.items() if k != "self"}
    listed = {k: v for k, v in OmegaConf.to_container(cfg).items() if k != "_target_"}
    assert set(listed) == set(args), f"{name}.yaml must list exactly the constructor arguments"
    for key, param in args.items():
        assert param.annotation is not inspect.Parameter.empty, f"{name}.{key} is not annotated"
        assert listed[key] == param.default, f"{name}.yaml {key} differs from the default"


@pytest.mark.parametrize("name", NAMES)
def test_weights_finite_nonnegative_on_wide_loss_range(name: str) -> None:
    balancer = make(name)
    for k, (losses, rows) in enumerate(loss_sequence(6)):
        w, scaled = engine_step(balancer, losses, rows)
        assert w.shape == (T,) and w.dtype == losses.dtype
        assert torch.isfinite(w).all() and (w >= 0).all(), (k, w)
        if scaled is not None:
            assert scaled.shape == rows.shape and torch.isfinite(scaled).all()
        if k % 2 == 1:
            balancer.epoch_end(losses)
        reg = balancer.regularizer()
        assert reg is None or torch.isfinite(reg)
        assert all(torch.isfinite(v).all() for v in balancer.extra_scalars().values())


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_gives_identical_next_steps(name: str) -> None:
    a = make(name, seed=3)
    seq = loss_sequence(9, seed=1)
    for k, (losses, rows) in enumerate(seq[:6]):
        engine_step(a, losses, rows)
        if k % 2 == 1:
            a.epoch_end(losses)
    if isinstance(a, Uncertainty):  # learn s a little so it is not at its initial value
        with torch.no_grad():
            a.log_var.copy_(torch.tensor([0.3, -1.2, 2.0]))

    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    b = instantiate(OmegaConf.load(CONF / f"{name}.yaml"))
    b_gen = torch.Generator()
    assert a.generator is not None
    b_gen.set_state(a.generator.get_state())  # the trainer restores the run's generator
    b.setup(TASKS, b_gen)
    b.load_state_dict(state)

    for losses, rows in seq[6:]:
        wa, ra = engine_step(a, losses, rows)
        wb, rb = engine_step(b, losses, rows)
        torch.testing.assert_close(wa, wb, rtol=0, atol=0)
        if ra is not None:
            torch.testing.assert_close(ra, rb, rtol=0, atol=0)
        a.epoch_end(losses)
        b.epoch_end(losses)


@pytest.mark.parametrize("name", NAMES)
def test_no_host_sync_in_per_step_hooks(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """weights / scale_rows / after_step run every step: reading a tensor back to the host
    (``.item()``, ``bool(t)``, ``float(t)``, ``.tolist()``) would stall a GPU pipeline."""
    balancer = make(name)
    steps = loss_sequence(3)
    engine_step(balancer, *steps[0])  # first-step paths (L(0), lazy sizing) ...

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("host synchronisation in a per-step balancer hook")

    with monkeypatch.context() as patch:
        for attr in ("item", "tolist", "__bool__", "__float__", "__int__", "numpy"):
            patch.setattr(torch.Tensor, attr, refuse)
        fresh = make(name)
        engine_step(fresh, *steps[0])  # ... and again under the guard
        for losses, rows in steps[1:]:
            engine_step(balancer, losses, rows)


def test_adam_helper_matches_torch_adam_with_weight_decay() -> None:
    g = generator(0)
    p = torch.randn(5, generator=g, dtype=torch.float64)
    ref = p.clone().requires_grad_()
    opt = torch.optim.Adam([ref], lr=0.025, weight_decay=0.01)
    m, v, step = torch.zeros_like(p), torch.zeros_like(p), torch.zeros((), dtype=torch.long)
    for _ in range(20):
        grad = torch.randn(5, generator=g, dtype=torch.float64)
        ref.grad = grad.clone()
        opt.step()
        adam_step_(p, grad, m, v, step, lr=0.025, weight_decay=0.01)
    torch.testing.assert_close(p, ref.detach(), rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- static


def test_static_weights_by_name_and_main_aux_form() -> None:
    s = Static(weights={"depth": 2.5})
    s.setup(TASKS, None)
    assert s.weights(torch.ones(T)).tolist() == [1.0, 2.5, 1.0]
    s = Static(main="depth", aux_weight=0.2)
    s.setup(TASKS, None)
    torch.testing.assert_close(s.weights(torch.ones(T)), torch.tensor([0.2, 0.8, 0.2]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weights": {"foo": 1.0}}, "balancer.weights.foo: no task named 'foo'; tasks are seg, depth, count"),
        ({"weights": {"seg": -1.0}}, "balancer.weights.seg: weight must be >= 0"),
        ({"main": "nope"}, "balancer.main: no task named 'nope'; tasks are seg, depth, count"),
        ({"weights": {"seg": 1.0}, "main": "seg"}, "balancer.weights and balancer.main"),
        ({"main": "seg", "aux_weight": 1.5}, "balancer.aux_weight: must be in [0, 1]"),
    ],
)
def test_static_config_errors_name_the_key(kwargs: dict, message: str) -> None:
    s = Static(**kwargs)
    with pytest.raises(ValueError) as info:
        s.setup(TASKS, None)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- uncertainty


@pytest.mark.parametrize(("kind", "optimum_factor"), [("depth", 1.0), ("classification", 2.0)])
def test_uncertainty_sigma_converges_to_paper_optimum(kind: str, optimum_factor: float) -> None:
    loss = torch.tensor([3.0])
    u = Uncertainty()
    u.setup([Task("t", kind, 1)], None)  # type: ignore[arg-type]
    opt = torch.optim.Adam(u.parameters(), lr=0.05)
    for _ in range(1500):
        opt.zero_grad()
        objective = (u.weights(loss) * loss.detach()).sum() + u.regularizer()
        objective.backward()
        opt.step()
    sigma2 = torch.exp(u.log_var.detach())[0].item()
    assert sigma2 == pytest.approx(optimum_factor * 3.0, rel=0.02)
    assert u.extra_scalars()["sigma/t"].item() == pytest.approx(math.sqrt(sigma2), rel=1e-5)


def test_uncertainty_initial_weights_follow_the_task_kind() -> None:
    u = Uncertainty(lr=0.01)
    u.setup(TASKS, None)
    assert u.weights(torch.ones(T)).tolist() == [1.0, 0.5, 0.5]
    assert u.lr == 0.01 and Uncertainty().lr is None


# --------------------------------------------------------------------------- gradnorm


def train_two_tasks(gn: GradNorm | None, steps: int = 200) -> tuple[Tensor, Tensor]:
    """A shared linear layer and two heads; task 1's loss is scaled by 0.02, so its gradient
    is 50x smaller and it trains slowly under uniform weights. Simulates the engine: the
    unweighted per-task gradients of the (last) shared layer go through ``scale_rows``.
    Returns the final weights and the final losses relative to the first ones."""
    torch.manual_seed(0)
    x = torch.randn(128, 8)
    targets = [x @ torch.randn(8, 1), x @ torch.randn(8, 1)]
    loss_scale = [1.0, 0.02]
    shared = nn.Linear(8, 16)
    heads = nn.ModuleList([nn.Linear(16, 1), nn.Linear(16, 1)])
    opt = torch.optim.SGD([*shared.parameters(), *heads.parameters()], lr=0.02)
    if gn is not None:
        gn.setup([Task("fast", "regression", 1), Task("slow", "regression", 1)], None)
    shared_params, head_params = list(shared.parameters()), list(heads.parameters())
    first: Tensor | None = None
    w = torch.ones(2)
    for _ in range(steps):
        features = shared(x)
        losses = torch.stack([s * F.mse_loss(h(features), y) for s, h, y in zip(loss_scale, heads, targets)])
        first = losses.detach() if first is None else first
        w = gn.weights(losses) if gn is not None else torch.ones(2)
        jac = torch.stack([
            torch.cat([g.flatten() for g in torch.autograd.grad(losses[t], shared_params, retain_graph=True)])
            for t in range(2)
        ])
        if gn is not None:
            rows = gn.scale_rows(jac, losses, w)
            torch.testing.assert_close(rows, w[:, None] * jac)  # scaled by the weights used this step
            assert gn.task_weights.sum().item() == pytest.approx(2.0, abs=1e-5)
            assert (gn.task_weights > 0).all()
        else:
            rows = jac
        for p, g in zip(head_params, torch.autograd.grad((w.detach() * losses).sum(), head_params)):
            p.grad = g
        direction, offset = rows.sum(0), 0
        for p in shared_params:
            p.grad = direction[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        opt.step()
    assert first is not None
    return w, losses.detach() / first


def test_gradnorm_raises_the_slow_task_and_keeps_sum_t() -> None:
    w, ratio = train_two_tasks(GradNorm(initial_loss="first_step"))  # the paper's L(0): re-weights from step 1
    assert w[1] > 1.0 > w[0]
    assert w.sum().item() == pytest.approx(2.0, abs=1e-5)
    _, uniform_ratio = train_two_tasks(None)
    assert ratio[1] < uniform_ratio[1]  # the slow task made more relative progress


def test_gradnorm_first_epoch_keeps_weights_until_the_epoch_mean_is_known() -> None:
    gn = GradNorm(initial_loss="first_epoch")
    gn.setup([Task("a", "regression", 1), Task("b", "regression", 1)], None)
    jac = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    for losses in (torch.tensor([129.0, 2.0]), torch.tensor([20.0, 1.9])):  # epoch 1: a falls steeply
        w = gn.weights(losses)
        gn.scale_rows(jac, losses, w)
        assert gn.task_weights.tolist() == [1.0, 1.0] and int(gn.adam_step) == 0
    gn.epoch_end(torch.tensor([40.0, 1.95]))
    torch.testing.assert_close(gn.initial_losses, torch.tensor([40.0, 1.95]))
    restored = GradNorm(initial_loss="first_epoch")
    restored.setup([Task("a", "regression", 1), Task("b", "regression", 1)], None)
    restored.load_state_dict(gn.state_dict())
    restored.epoch_end(torch.tensor([1.0, 1.0]))  # L(0) is kept once set
    torch.testing.assert_close(restored.initial_losses, torch.tensor([40.0, 1.95]))
    # b has made less progress relative to its first epoch (1.9/1.95 vs 10/40): it gains weight.
    losses = torch.tensor([10.0, 1.9])
    restored.scale_rows(jac, losses, restored.weights(losses))
    assert restored.task_weights[1] > 1.0 > restored.task_weights[0] and int(restored.adam_step) == 1
    with pytest.raises(ValueError, match="initial_loss"):
        GradNorm(initial_loss="first_batch")


# --------------------------------------------------------------------------- dwa


def test_dwa_uniform_for_two_epochs_then_follows_formula() -> None:
    dwa = DWA(temp=2.0)
    dwa.setup(TASKS, None)
    any_losses = torch.rand(T)
    epochs = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, 2.0, 3.3]), torch.tensor([0.4, 1.0, 3.3])]
    assert dwa.weights(any_losses).tolist() == [1.0, 1.0, 1.0]  # epoch 1
    dwa.epoch_end(epochs[0])
    assert dwa.weights(any_losses).tolist() == [1.0, 1.0, 1.0]  # epoch 2
    for k in (1, 2):
        dwa.epoch_end(epochs[k])  # now in epoch k + 2
        r = [epochs[k][t].item() / epochs[k - 1][t].item() for t in range(T)]
        e = [math.exp(ri / 2.0) for ri in r]
        expected = torch.tensor([T * ei / sum(e) for ei in e])
        torch.testing.assert_close(dwa.weights(any_losses), expected)
    assert dwa.weights(any_losses)[2] > dwa.weights(any_losses)[0]  # the stalled task gains


# --------------------------------------------------------------------------- rlw


def test_rlw_reproducible_from_seed_and_sums_to_t() -> None:
    def draws(seed: int | None) -> Tensor:
        r = RLW()
        r.setup(TASKS, None if seed is None else generator(seed))
        return torch.stack([r.weights(torch.ones(T)) for _ in range(5)])

    a, b, c = draws(7), draws(7), draws(8)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)
    torch.testing.assert_close(a.sum(1), torch.full((5,), float(T)))
    assert not torch.allclose(a[0], a[1])  # a fresh draw each step
    torch.testing.assert_close(draws(None), draws(None), rtol=0, atol=0)
    # without a run generator RLW owns one and resumes its sequence from state_dict()
    owner = RLW()
    owner.setup(TASKS, None)
    owner.weights(torch.ones(T))
    buffer = io.BytesIO()
    torch.save(owner.state_dict(), buffer)
    buffer.seek(0)
    resumed = RLW()
    resumed.setup(TASKS, None)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    torch.testing.assert_close(resumed.weights(torch.ones(T)), owner.weights(torch.ones(T)), rtol=0, atol=0)


# --------------------------------------------------------------------------- geometric


def test_geometric_weighted_gradient_is_gradient_of_its_objective() -> None:
    theta = torch.tensor([0.3, -1.2, 2.0, 0.7], dtype=torch.float64, requires_grad=True)
    scales = torch.tensor([1e-3, 1.0, 1e3], dtype=torch.float64)
    losses = scales * torch.stack([theta[0] ** 2 + theta[3] ** 2, (theta[1] - theta[3]) ** 2 + 0.1, theta[2].exp()])
    w = Geometric().weights(losses)
    (weighted,) = torch.autograd.grad((w.detach() * losses).sum(), theta, retain_graph=True)
    (exact,) = torch.autograd.grad(T * losses.prod() ** (1.0 / T), theta)
    torch.testing.assert_close(weighted, exact)
    # equal losses: exactly uniform
    torch.testing.assert_close(Geometric().weights(torch.full((T,), 0.37)), torch.ones(T))


# --------------------------------------------------------------------------- minmax


def test_minmax_puts_most_weight_on_worst_normalised_task() -> None:
    initial = torch.tensor([1.0, 10.0, 4.0])
    later = torch.tensor([0.9, 5.0, 3.8])  # raw: task 1 largest; normalised 0.9, 0.5, 0.95: task 2 worst
    hard, soft = MinMax(tau=0.0), MinMax(tau=0.1)
    for m in (hard, soft):
        m.setup(TASKS, None)
        m.weights(initial)
    assert hard.weights(later).tolist() == [0.0, 0.0, float(T)]
    w = soft.weights(later)
    assert w.argmax().item() == 2 and w[1] < w[0] < w[2]
    assert w.sum().item() == pytest.approx(T)


# --------------------------------------------------------------------------- famo


def test_famo_initial_direction_is_the_balanced_log_loss_gradient() -> None:
    famo = make("famo")
    losses = torch.tensor([1e-3, 2.0, 50.0])
    w = famo.weights(losses)
    # w_t L_t equal for all t: sum_t w_t grad L_t is proportional to sum_t grad log L_t
    torch.testing.assert_close(w * losses, (w * losses).mean().expand(T))
    torch.testing.assert_close(famo.weights(torch.full((T,), 4.0)), torch.ones(T))


def test_famo_lowers_the_weight_of_the_task_whose_log_loss_fell_fastest() -> None:
    famo = make("famo")
    losses = torch.tensor([1.0, 1.0, 1.0])
    before = famo.weights(losses)
    famo.after_step(lambda: torch.tensor([0.5, 0.9, 0.95]))  # task 0 fell fastest
    after = famo.weights(losses)
    assert after[0] < before[0] and after[2] > before[2]
    assert after.sum().item() == pytest.approx(T)


def test_famo_logit_update_matches_official_rule() -> None:
    # Official update: g = d softmax(xi) / d xi ^T delta (autograd), then Adam(weight_decay=gamma).
    famo = make("famo")
    xi = torch.zeros(T, requires_grad=True)
    opt = torch.optim.Adam([xi], lr=famo.lr, weight_decay=famo.gamma)
    g = generator(5)
    for _ in range(10):
        prev = torch.rand(T, generator=g) + 0.5
        new = prev * (0.7 + 0.3 * torch.rand(T, generator=g))
        famo.weights(prev)
        famo.after_step(lambda new=new: new)
        delta = (prev + 1e-8).log() - (new + 1e-8).log()
        (grad,) = torch.autograd.grad(torch.softmax(xi, -1), xi, grad_outputs=delta)
        xi.grad = grad
        opt.step()
    torch.testing.assert_close(famo.logits, xi.detach(), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- dbmtl


def test_dbmtl_rows_have_equal_norms_and_are_loss_scale_invariant() -> None:
    g = generator(2)
    a, b = make("dbmtl"), make("dbmtl")
    scale = torch.tensor([1e-2, 1.0, 1e3])  # (log(L + 1e-8) is scale-free up to the 1e-8)
    for _ in range(4):
        losses = torch.rand(T, generator=g) + 0.1
        jac = torch.randn(T, P, generator=g) * torch.tensor([[1e-2], [1.0], [30.0]])
        rows_a = a.scale_rows(jac, losses, a.weights(losses))
        # the same problem with every loss rescaled: log balancing removes the scale
        rows_b = b.scale_rows(scale[:, None] * jac, scale * losses, b.weights(scale * losses))
        norms = rows_a.norm(dim=1)
        torch.testing.assert_close(norms, norms.max().expand(T), rtol=1e-5, atol=0)
        torch.testing.assert_close(norms.max(), a.grad_ema.norm(dim=1).max())
        torch.testing.assert_close(rows_a, rows_b, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(a.weights(torch.tensor([0.5, 2.0, 4.0])), 1 / torch.tensor([0.5, 2.0, 4.0]))


def test_dbmtl_ema_follows_beta_schedule() -> None:
    d = DBMTL(beta=0.5, beta_sigma=1.0)
    d.setup(TASKS, None)
    losses = torch.tensor([2.0, 1.0, 4.0])
    g1, g2 = torch.randn(T, P, generator=generator(0)), torch.randn(T, P, generator=generator(1))
    d.scale_rows(g1, losses, d.weights(losses))
    d.scale_rows(g2, losses, d.weights(losses))
    l1, l2 = g1 / losses[:, None], g2 / losses[:, None]
    ema1 = (1 - 0.5) * l1  # beta_1 = 0.5 / 1
    ema2 = 0.25 * ema1 + 0.75 * l2  # beta_2 = 0.5 / 2
    torch.testing.assert_close(d.grad_ema, ema2, rtol=1e-5, atol=1e-6)
