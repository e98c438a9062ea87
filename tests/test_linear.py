"""Linear multi-task regression: the closed-form Evgeniou & Pontil estimator, its limits,
and the runner (``sharing=soft backbone=linear dataset=linear_tasks``) converging to it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor

from mtl_runner.data.linear_tasks import linear_tasks_data
from mtl_runner.linear import block_design, fit_independent, fit_mtl, fit_pooled, per_task_mse
from mtl_runner.runner import run_experiment
from scripts import linear_mtl
from tests.conftest import compose_config

pytestmark = pytest.mark.usefixtures("one_thread")

T, P, N = 6, 5, 25


def _random_problem(seed: int = 0, n: int = N) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    xs = torch.randn(T, n, P, generator=gen, dtype=torch.float64)
    ys = torch.randn(T, n, generator=gen, dtype=torch.float64) + xs.sum(-1)
    return xs, ys


def test_block_design_reproduces_each_task_model() -> None:
    xs, _ = _random_problem()
    gen = torch.Generator().manual_seed(1)
    beta0, v = torch.randn(P, generator=gen, dtype=torch.float64), torch.randn(T, P, generator=gen, dtype=torch.float64)
    z = block_design(list(xs))
    assert z.shape == (T * N, P + T * P)
    predicted = z @ torch.cat([beta0, v.reshape(-1)])
    expected = torch.cat([x @ (beta0 + vt) for x, vt in zip(xs, v)])
    torch.testing.assert_close(predicted, expected)


@pytest.mark.parametrize("lam", [0.3, 6.25, 100.0])
def test_solution_zeroes_the_objective_gradient(lam: float) -> None:
    """Independent of the block design: at the minimiser of sum_t ||y_t - X_t b_t||^2 +
    lam sum_t ||b_t - mean(b)||^2 (beta_0 minimised out) every task's gradient vanishes."""
    xs, ys = _random_problem(2)
    betas = fit_mtl(xs, ys, lam)
    mean = betas.mean(0)
    for x, y, b in zip(xs, ys, betas):
        grad = -2 * x.T @ (y - x @ b) + 2 * lam * (b - mean)
        assert grad.abs().max() < 1e-9


@pytest.mark.parametrize("lam", [0.0, 0.5, 6.25, 40.0, 1e4])
def test_orthonormal_design_shrinkage_identity(lam: float) -> None:
    """X_t^T X_t = n I: beta_t = (1 - a) beta_t^ols + a mean(beta^ols), a = lam / (n + lam)."""
    gen = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(T, N, P, generator=gen, dtype=torch.float64))
    xs = q * N**0.5
    torch.testing.assert_close(xs[0].T @ xs[0], N * torch.eye(P, dtype=torch.float64))
    ys = torch.randn(T, N, generator=gen, dtype=torch.float64)
    ols = fit_independent(xs, ys)
    a = lam / (N + lam)
    expected = (1 - a) * ols + a * ols.mean(0)
    torch.testing.assert_close(fit_mtl(xs, ys, lam), expected, rtol=0, atol=1e-12)


def test_limits_independent_and_pooled() -> None:
    xs, ys = _random_problem(4)
    independent, pooled = fit_independent(xs, ys), fit_pooled(xs, ys)
    assert (independent - pooled).abs().max() > 0.1  # the limits are distinct
    torch.testing.assert_close(fit_mtl(xs, ys, 0.0), independent, rtol=0, atol=1e-10)
    torch.testing.assert_close(fit_mtl(xs, ys, 1e-9), independent, rtol=0, atol=1e-8)
    torch.testing.assert_close(fit_mtl(xs, ys, 1e9), pooled, rtol=0, atol=1e-6)
    torch.testing.assert_close(fit_mtl(xs, ys, float("inf")), pooled)


def test_unequal_task_sizes_and_bad_lambda() -> None:
    xs, ys = _random_problem(5)
    x_list, y_list = [xs[0], xs[1, :12]], [ys[0], ys[1, :12]]
    betas = fit_mtl(x_list, y_list, 1.0)
    assert betas.shape == (2, P) and per_task_mse(betas, x_list, y_list).shape == (2,)
    with pytest.raises(ValueError, match="lambda must be >= 0"):
        fit_mtl(xs, ys, -1.0)


def _train_linear(tmp_path: Path, sharing: list[str], epochs: int, lr: float, momentum: float) -> torch.Tensor:
    """Full-batch SGD with a constant step on the runner's linear_tasks problem; returns
    the learnt per-task coefficients (T, p) from the run's checkpoint."""
    cfg = compose_config([
        "dataset=linear_tasks", "backbone=linear", *sharing, "optimizer=sgd", f"optimizer.lr={lr}",
        f"optimizer.momentum={momentum}", "optimizer.weight_decay=0", f"trainer.batch_size={N}",
        f"trainer.epochs={epochs}", "trainer.lr_schedule=constant", "trainer.device=cpu", "trainer.progress=off",
        "diagnostics=off", "baseline=off",
    ])
    results = run_experiment(cfg, tmp_path)
    assert results["status"] == "completed"
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)["model"]
    if "encoder.stages.0.1.weight" in state:  # sharing=hard: one map for every task
        return state["encoder.stages.0.1.weight"].double().reshape(1, P).expand(T, P)
    return torch.stack([state[f"encoders.task{t}.stages.0.1.weight"].reshape(P) for t in range(T)]).double()


def test_runner_soft_sharing_converges_to_closed_form(tmp_path: Path) -> None:
    """Per-task mean squared error + lam sum_{i<j} ||beta_i - beta_j||^2 is 1/n times the
    Evgeniou-Pontil objective with lambda_ep = n T lam. The step size and momentum are
    near the heavy-ball optimum for this quadratic (curvature between ~0.6 and ~5)."""
    lambda_ep = 6.25
    learnt = _train_linear(tmp_path, ["sharing=soft", f"sharing.lam={lambda_ep / (N * T)}"], epochs=40, lr=0.45, momentum=0.25)
    data = linear_tasks_data()
    expected = fit_mtl(*data.train, lambda_ep)
    assert (expected - fit_independent(*data.train)).abs().max() > 0.05  # lambda matters here
    torch.testing.assert_close(learnt, expected, rtol=0, atol=1e-5)


def test_runner_soft_sharing_with_large_lambda_is_pooling(tmp_path: Path) -> None:
    """lambda_ep = 1000 (a = lambda / (n + lambda) ~ 0.98 of the way to the pooled fit)
    puts the penalty's curvature at ~80 against ~0.6 for the least curved direction:
    heavy-ball momentum still converges in 80 full-batch steps."""
    lambda_ep = 1000.0
    learnt = _train_linear(tmp_path, ["sharing=soft", f"sharing.lam={lambda_ep / (N * T)}"], epochs=80, lr=0.04, momentum=0.7)
    data = linear_tasks_data()
    torch.testing.assert_close(learnt, fit_mtl(*data.train, lambda_ep), rtol=0, atol=1e-4)
    pooled, independent = fit_pooled(*data.train), fit_independent(*data.train)
    assert (learnt - pooled).abs().max() < 0.05 * (independent - pooled).abs().max()


@pytest.mark.parametrize(
    ("sharing", "closed_form", "lr"),
    # hard: one map carries all T task losses, so T times the curvature and a T times smaller step
    [("none", fit_independent, 0.45), ("hard", fit_pooled, 0.45 / T)],
)
def test_runner_separate_and_hard_are_independent_and_pooled(
    tmp_path: Path, sharing: str, closed_form: Callable[[Tensor, Tensor], Tensor], lr: float
) -> None:
    learnt = _train_linear(tmp_path, [f"sharing={sharing}"], epochs=40, lr=lr, momentum=0.25)
    torch.testing.assert_close(learnt, closed_form(*linear_tasks_data().train), rtol=0, atol=1e-5)


def test_demonstration_script_writes_table_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "linear.png"
    linear_mtl.main(["--seeds", "2", "--points", "6", "--out", str(out)])
    printed = capsys.readouterr().out
    assert out.stat().st_size > 0
    for fragment in ("independent OLS", "pooled OLS", "best lambda"):
        assert fragment in printed
