"""IMTL-L (and the IMTL hybrid) and STCH: each paper's defining property, agreement with
torchjd 0.18's scalarisers (``torchjd.scalarization.IMTLL`` and ``STCH``, run as oracles
under autograd), degenerate inputs, state round trips, and short end-to-end runs including
an exact resume."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import Tensor
from torchjd import scalarization

from mtl_runner.cli import CONF_DIR
from mtl_runner.errors import ConfigError
from mtl_runner.optim.balancers.base import Balancer
from mtl_runner.optim.balancers.imtl_l import IMTLL
from mtl_runner.optim.balancers.stch import STCH
from mtl_runner.runner import run_experiment
from mtl_runner.tasks import Task
from tests.conftest import TINY, compose_config

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
NAMES = ["imtl_l", "stch"]
TASKS = (Task("seg", "segmentation", 13), Task("depth", "depth", 1), Task("count", "regression", 1))
T = len(TASKS)
SMALLER = ["dataset.num_train=16", "dataset.num_val=8", "dataset.num_test=8", "dataset.image_size=16", "trainer.batch_size=8"]


def make(name: str, **options: object) -> Balancer:
    balancer = instantiate(OmegaConf.load(CONF_DIR / "balancer" / f"{name}.yaml"), **options)
    balancer.setup(TASKS, torch.Generator().manual_seed(0))
    return balancer


def fit_scales(balancer: IMTLL, losses: Tensor, steps: int = 2000) -> None:
    """Train ``s`` as the engine does: on ``(w * losses.detach()).sum() + regularizer()``."""
    optimizer = torch.optim.Adam(balancer.parameters(), lr=0.05)
    for _ in range(steps):
        optimizer.zero_grad()
        ((balancer.weights(losses) * losses.detach()).sum() + balancer.regularizer()).backward()
        optimizer.step()


def task_losses(theta: Tensor, scales: Tensor) -> Tensor:
    """Three smooth losses of a shared parameter vector, each multiplied by its scale."""
    return scales * torch.stack([theta[0] ** 2 + theta[3] ** 2, (theta[1] - theta[3]) ** 2 + 0.1, theta[2].exp()])


# ----------------------------------------------------- state and degenerate inputs
# (tests/test_balancers.py runs the common contracts on every conf/balancer option; these
# reach the state those leave untouched: fitted scales, a finished warm-up)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_gives_identical_weights(name: str) -> None:
    options = {"warmup_epochs": 2} if name == "stch" else {}
    a = make(name, **options)
    if isinstance(a, IMTLL):
        fit_scales(a, torch.tensor([3.0, 0.02, 50.0]), steps=20)
    for epoch_mean in (torch.tensor([2.0, 0.5, 9.0]), torch.tensor([1.5, 0.4, 7.0])):
        a.weights(epoch_mean * 1.1)
        a.epoch_end(epoch_mean)
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b = instantiate(OmegaConf.load(CONF_DIR / "balancer" / f"{name}.yaml"), **options)
    b.setup(TASKS, None)
    b.load_state_dict(torch.load(buffer, weights_only=True))
    for losses in (torch.tensor([1.0, 0.3, 6.0]), torch.tensor([0.9, 0.35, 4.0])):
        torch.testing.assert_close(a.weights(losses), b.weights(losses), rtol=0, atol=0)
    assert not torch.equal(a.weights(torch.tensor([1.0, 0.3, 6.0])), torch.ones(T)), "the state was never exercised"


@pytest.mark.parametrize("name", NAMES)
def test_no_host_sync_in_weights_and_epoch_end(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("host synchronisation in a balancer hook")

    for options in ({}, {"warmup_epochs": 0}) if name == "stch" else ({},):
        balancer = make(name, **options)
        with monkeypatch.context() as patch:
            for attr in ("item", "tolist", "__bool__", "__float__", "__int__", "numpy"):
                patch.setattr(Tensor, attr, refuse)
            for losses in (torch.tensor([1.0, 0.0, 1e4]), torch.tensor([0.5, float("nan"), 3.0])):
                balancer.weights(losses)
                balancer.epoch_end(losses)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "losses",
    [[0.0, 1e4, 1e-4], [float("nan"), 1.0, 2.0], [float("inf"), 1.0, 2.0], [float("nan")] * 3, [1e-30, 1e30, 1.0]],
)
def test_weights_finite_and_nonnegative_on_degenerate_losses(name: str, losses: list[float]) -> None:
    for options in ({}, {"warmup_epochs": 0}) if name == "stch" else ({},):
        balancer = make(name, **options)
        for _ in range(2):
            w = balancer.weights(torch.tensor(losses))
            assert torch.isfinite(w).all() and (w >= 0).all(), (options, w)


# --------------------------------------------------------------------------- IMTL-L


def test_imtl_l_starts_uniform() -> None:
    balancer = make("imtl_l")
    torch.testing.assert_close(balancer.weights(torch.tensor([3.0, 0.1, 7.0])), torch.ones(T))
    assert balancer.regularizer().item() == 0.0
    assert set(balancer.extra_scalars()) == {"imtl_scale/seg", "imtl_scale/depth", "imtl_scale/count"}


def test_imtl_l_optimum_scales_every_loss_to_one() -> None:
    losses = torch.tensor([3.0, 0.02, 50.0])
    balancer = make("imtl_l")
    fit_scales(balancer, losses)
    scaled = balancer.weights(losses).detach() * losses
    torch.testing.assert_close(scaled, torch.ones(T), rtol=1e-3, atol=0)
    torch.testing.assert_close(torch.stack(list(balancer.extra_scalars().values())), 1.0 / losses, rtol=1e-3, atol=0)


def test_imtl_l_effective_gradient_is_invariant_to_a_loss_scale_at_the_optimum() -> None:
    """Multiplying a task's loss by c leaves the model's gradient unchanged once s is fitted."""
    theta = torch.tensor([0.3, -1.2, 2.0, 0.7], dtype=F64, requires_grad=True)
    gradients = []
    for scales in (torch.ones(T, dtype=F64), torch.tensor([100.0, 1e-3, 1.0], dtype=F64)):
        losses = task_losses(theta, scales)
        balancer = IMTLL()
        balancer.setup(TASKS, None)
        balancer.double()
        fit_scales(balancer, losses.detach())
        weights = balancer.weights(losses.detach()).detach()
        gradients.append(torch.autograd.grad((weights * losses).sum(), theta)[0])
    torch.testing.assert_close(gradients[0], gradients[1], rtol=2e-3, atol=0)


def test_imtl_l_engine_gradients_match_torchjd() -> None:
    """The engine's two backward passes (model with detached weights, s with the balancer's
    objective) give torchjd's IMTLL gradients of ``sum_t e^{s_t} L_t - s_t`` in the model and s."""
    theta = torch.tensor([0.3, -1.2, 2.0, 0.7], dtype=F64, requires_grad=True)
    s = torch.tensor([0.4, -2.0, 1.1], dtype=F64)
    losses = task_losses(theta, torch.tensor([1.0, 10.0, 0.1], dtype=F64))
    oracle = scalarization.IMTLL(T).double()
    with torch.no_grad():
        oracle.log_scale.copy_(s)
    want_theta, want_s = torch.autograd.grad(oracle(losses), (theta, oracle.log_scale), retain_graph=True)

    balancer = IMTLL()
    balancer.setup(TASKS, None)
    balancer.double()
    with torch.no_grad():
        balancer.log_scale.copy_(s)
    w = balancer.weights(losses.detach())
    (got_theta,) = torch.autograd.grad((w.detach() * losses).sum(), theta)
    (got_s,) = torch.autograd.grad((w * losses.detach()).sum() + balancer.regularizer(), balancer.log_scale)
    torch.testing.assert_close(got_theta, want_theta)
    torch.testing.assert_close(got_s, want_s)


def test_imtl_l_degenerate_inputs() -> None:
    single = IMTLL()
    single.setup(TASKS[:1], None)
    fit_scales(single, torch.tensor([4.0]), steps=1500)
    assert single.weights(torch.tensor([4.0])).item() == pytest.approx(0.25, rel=1e-3)
    # A zero loss has no finite optimum: s grows by the regulariser's pull, the weight stays finite.
    zero = make("imtl_l")
    fit_scales(zero, torch.tensor([0.0, 1.0, 1.0]), steps=50)
    assert zero.log_scale[0].item() > 1.0 and torch.isfinite(zero.weights(torch.zeros(T))).all()
    with pytest.raises(ConfigError, match=r"^balancer\.lr: must be > 0"):
        IMTLL(lr=0.0)


def test_imtl_experiment_is_imtl_l_with_imtl_g_and_combines_with_a_recipe() -> None:
    for overrides in (["experiment=imtl"], ["experiment=[multimnist_lenet,imtl]"]):
        cfg = compose_config(overrides)
        assert cfg.balancer._target_ == "mtl_runner.optim.balancers.imtl_l.IMTLL", overrides
        assert cfg.surgery._target_ == "mtl_runner.optim.surgery.imtl_g.IMTLG", overrides
    assert compose_config(["experiment=[multimnist_lenet,imtl]"]).dataset._target_.endswith("multimnist")


# --------------------------------------------------------------------------- STCH


def stch_after_warmup(normaliser: Tensor, **options: object) -> STCH:
    balancer = make("stch", warmup_epochs=1, **options)
    assert isinstance(balancer, STCH)
    balancer.epoch_end(normaliser)
    return balancer


@pytest.mark.parametrize("mu", [0.05, 1.0, 20.0])
def test_stch_weights_are_the_gradient_of_torchjds_stch_on_the_log_losses(mu: float) -> None:
    """``F = T STCH_mu(log L | lambda, z* = log n)`` with torchjd's scalariser (the paper's
    formula), the preference scaled to mean 1 as in the authors' code."""
    theta = torch.tensor([0.3, -1.2, 2.0, 0.7], dtype=F64, requires_grad=True)
    losses = task_losses(theta, torch.tensor([1e-2, 1.0, 1e2], dtype=F64))
    normaliser = torch.tensor([0.02, 3.0, 300.0])
    preference = {"seg": 2.0, "depth": 0.5}
    balancer = stch_after_warmup(normaliser, mu=mu, preference=preference)
    lam = torch.tensor([2.0, 0.5, 1.0], dtype=F64)
    w = balancer.weights(losses.detach())
    (weighted,) = torch.autograd.grad((w * losses).sum(), theta, retain_graph=True)
    oracle = scalarization.STCH(mu, weights=lam * T / lam.sum(), reference=normaliser.to(F64).log())
    (exact,) = torch.autograd.grad(T * oracle(losses.log()), theta, retain_graph=True)
    torch.testing.assert_close(weighted, exact)
    (own,) = torch.autograd.grad(balancer.objective(losses), theta)
    torch.testing.assert_close(own, exact)


def test_stch_tends_to_tchebycheff_as_mu_vanishes_and_to_log_losses_as_it_grows() -> None:
    losses = torch.tensor([0.5, 6.0, 20.0], dtype=F64)
    normaliser = torch.tensor([1.0, 3.0, 40.0])
    x = (losses / normaliser.to(F64)).log()  # [-0.69, 0.69, -0.69]: task 1 is the worst
    sharp = stch_after_warmup(normaliser, mu=1e-3)
    assert sharp.objective(losses).item() == pytest.approx(T * x.max().item(), abs=1e-2)
    torch.testing.assert_close(sharp.weights(losses) * losses, torch.tensor([0.0, T, 0.0], dtype=F64), atol=1e-6, rtol=0)
    flat = stch_after_warmup(normaliser, mu=1e4)
    assert (flat.objective(losses) - T * 1e4 * math.log(T)).item() == pytest.approx(x.sum().item(), abs=1e-3)
    torch.testing.assert_close(flat.weights(losses), 1.0 / losses, rtol=1e-3, atol=0)
    weighted = stch_after_warmup(normaliser, mu=1e4, preference={"count": 4.0})
    torch.testing.assert_close(weighted.weights(losses), torch.tensor([0.5, 0.5, 2.0], dtype=F64) / losses, rtol=1e-3, atol=0)


def test_stch_warms_up_on_log_losses_then_normalises_by_the_last_warmup_epoch() -> None:
    balancer = make("stch", warmup_epochs=2)
    losses = torch.tensor([0.5, 6.0, 20.0])
    torch.testing.assert_close(balancer.weights(losses), 1.0 / losses)
    balancer.epoch_end(torch.tensor([9.0, 9.0, 9.0]))  # not the last warm-up epoch: ignored
    torch.testing.assert_close(balancer.weights(losses), 1.0 / losses)
    balancer.epoch_end(losses)
    # at the normaliser every x_t = 0: the same weights as the warm-up (no jump at the switch)
    torch.testing.assert_close(balancer.weights(losses), 1.0 / losses)
    moved = torch.tensor([0.5, 12.0, 20.0])
    w = balancer.weights(moved)
    assert w[1] * moved[1] > 1.0 > w[0] * moved[0], "the task that got worse gains weight"
    balancer.epoch_end(torch.tensor([100.0, 100.0, 100.0]))  # later epochs keep the normaliser
    torch.testing.assert_close(balancer.weights(moved), w)


def test_stch_without_warmup_normalises_by_the_first_step() -> None:
    balancer = make("stch", warmup_epochs=0)
    first = torch.tensor([0.5, 6.0, 20.0])
    torch.testing.assert_close(balancer.weights(first), 1.0 / first)
    later = torch.tensor([0.25, 6.0, 20.0])
    share = balancer.weights(later) * later / T  # the softmax: the improved task's share falls
    assert share[0] < 1 / T < share[1] and share.sum().item() == pytest.approx(1.0)


def test_stch_effective_gradient_is_invariant_to_a_loss_scale() -> None:
    """Log-losses normalised by the warm-up: multiplying a task's loss by c changes nothing
    in ``w_t grad L_t`` (the weight falls by c)."""
    losses, normaliser = torch.tensor([0.5, 6.0, 20.0]), torch.tensor([1.0, 3.0, 40.0])
    c = torch.tensor([1e3, 1.0, 1e-3])
    plain = stch_after_warmup(normaliser).weights(losses)
    scaled = stch_after_warmup(normaliser * c).weights(losses * c)
    torch.testing.assert_close(scaled * c, plain)


def test_stch_degenerate_inputs_are_defined() -> None:
    single = make("stch", warmup_epochs=0)
    single.setup(TASKS[:1], None)
    single.weights(torch.tensor([2.0]))
    torch.testing.assert_close(single.weights(torch.tensor([8.0])), torch.tensor([0.125]))
    # a non-finite loss weighs 0 and leaves the softmax of the others
    balancer = stch_after_warmup(torch.tensor([1.0, 3.0, 40.0]))
    reference = make("stch", warmup_epochs=1)
    reference.setup(TASKS[1:], None)
    reference.epoch_end(torch.tensor([3.0, 40.0]))
    w = balancer.weights(torch.tensor([float("nan"), 6.0, 20.0]))
    assert w[0].item() == 0.0
    torch.testing.assert_close(w[1:], reference.weights(torch.tensor([6.0, 20.0])) * T / (T - 1))
    # an unusable normaliser entry (non-finite or 0) means no normalisation for that task
    odd = stch_after_warmup(torch.tensor([float("nan"), 0.0, 40.0]))
    torch.testing.assert_close(odd.log_normaliser, torch.tensor([0.0, 0.0, math.log(40.0)]))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"mu": 0.0}, r"^balancer\.mu: must be a finite float > 0"),
        ({"warmup_epochs": -1}, r"^balancer\.warmup_epochs: must be an integer >= 0"),
        ({"warmup_epochs": 1.5}, r"^balancer\.warmup_epochs: must be an integer >= 0"),
        ({"preference": {"sgm": 1.0}}, r"^balancer\.preference\.sgm: no task named 'sgm'; tasks are seg, depth, count$"),
        ({"preference": {"seg": -1.0}}, r"^balancer\.preference\.seg: must be a finite number >= 0"),
        ({"preference": {"seg": "a"}}, r"^balancer\.preference\.seg: must be a number"),
        ({"preference": {"seg": 0, "depth": 0, "count": 0}}, r"^balancer\.preference: at least one task needs a weight > 0"),
    ],
)
def test_stch_bad_options_name_the_key(options: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        STCH(**options).setup(TASKS, None)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- end to end


def results(path: Path) -> dict[str, object]:
    return json.loads((path / "results.json").read_text())


@pytest.mark.parametrize(
    "choice",
    [["experiment=imtl"], ["balancer=stch", "balancer.warmup_epochs=1", "surgery=pcgrad"], ["balancer=imtl_l", "surgery=upgrad", "surgery.space=features"]],
    ids=["imtl", "stch+pcgrad", "imtl_l+upgrad_features"],
)
def test_trains_end_to_end(tmp_path: Path, choice: list[str]) -> None:
    run_experiment(compose_config([*TINY, *SMALLER, *choice, "trainer.epochs=2", "diagnostics.every_n_steps=0"]), tmp_path)
    assert results(tmp_path)["status"] == "completed"


@pytest.mark.parametrize("choice", [["balancer=imtl_l"], ["balancer=stch", "balancer.warmup_epochs=1"]], ids=["imtl_l", "stch"])
def test_resume_continues_the_state_exactly(tmp_path: Path, choice: list[str]) -> None:
    """One epoch, then resume for a second: the same results as two epochs straight (IMTL-L's
    scales and their optimizer state; STCH's normaliser, set at the end of the first epoch)."""
    base = [*TINY, *SMALLER, *choice, "trainer.lr_schedule=constant", "diagnostics.every_n_steps=0"]
    reference = run_experiment(compose_config([*base, "trainer.epochs=2"]), tmp_path / "reference")
    run_experiment(compose_config([*base, "trainer.epochs=1"]), tmp_path / "split")
    resumed = run_experiment(compose_config([*base, "trainer.epochs=2", f"resume={tmp_path / 'split'}"]), tmp_path / "split")
    assert resumed["resumed"] is True
    assert resumed["tasks"] == reference["tasks"]
