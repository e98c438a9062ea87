"""Linear multi-task regression (Evgeniou & Pontil, KDD 2004): when does sharing pay?

Six related regressions (p = 5, 25 training samples each, beta_0 = (1.5, -2, 0, 1, -0.5),
task deviations N(0, 0.4^2), noise sd 1, 500 test samples per task). For every penalty
lambda on a log grid we fit the closed-form MTL estimator and report its test MSE
(average over tasks), next to independent OLS per task (lambda -> 0) and one pooled OLS
fit (lambda -> inf). Each number is the mean over ``--seeds`` independent draws of the
whole problem (data and task deviations), 20 by default: one draw is too noisy to
locate the best lambda. Theory for this setting puts it near sigma^2 / tau^2 = 6.25.

    python scripts/linear_mtl.py [--seeds 20] [--out outputs/linear_mtl.png]

Runs in a few seconds on a CPU.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch

from mtl_runner.data.linear_tasks import linear_tasks_data
from mtl_runner.linear import fit_independent, fit_mtl, fit_pooled, test_mse

TASK_SD, NOISE_SD = 0.4, 1.0


def run(seeds: int, lambdas: np.ndarray) -> dict[str, np.ndarray]:
    """Test MSE per seed: ``mtl`` (seeds, len(lambdas)); ``independent``, ``pooled`` and
    ``oracle`` (the true coefficients: the noise floor) (seeds,)."""
    mtl = np.empty((seeds, len(lambdas)))
    independent, pooled, oracle = np.empty(seeds), np.empty(seeds), np.empty(seeds)
    for s in range(seeds):
        data = linear_tasks_data(num_tasks=6, p=5, n_train=25, n_test=500, task_sd=TASK_SD, noise_sd=NOISE_SD, seed=s)
        (x, y), test = data.train, data.test
        independent[s] = test_mse(fit_independent(x, y), *test)
        pooled[s] = test_mse(fit_pooled(x, y), *test)
        oracle[s] = test_mse(data.betas, *test)
        for i, lam in enumerate(lambdas):
            mtl[s, i] = test_mse(fit_mtl(x, y, float(lam)), *test)
    return {"mtl": mtl, "independent": independent, "pooled": pooled, "oracle": oracle}


def _se(values: np.ndarray) -> np.ndarray:
    """Standard error of the mean over seeds (axis 0)."""
    n = values.shape[0]
    return values.std(axis=0, ddof=1) / math.sqrt(n) if n > 1 else np.zeros(values.shape[1:])


def print_table(lambdas: np.ndarray, results: dict[str, np.ndarray]) -> int:
    """Print the table and the summary; returns the index of the best lambda."""
    from rich.console import Console
    from rich.table import Table

    mtl, mtl_se = results["mtl"].mean(0), _se(results["mtl"])
    ind, pooled, oracle = (results[k].mean() for k in ("independent", "pooled", "oracle"))
    best = int(mtl.argmin())
    seeds = results["mtl"].shape[0]
    table = Table(title=f"Test MSE vs lambda (mean over {seeds} seeds)")
    table.add_column("lambda", justify="right")
    table.add_column("MTL MSE", justify="right")
    table.add_column("± s.e.", justify="right")
    table.add_column("vs independent", justify="right")
    for i, lam in enumerate(lambdas):
        mark = " *" if i == best else ""
        table.add_row(f"{lam:.3g}{mark}", f"{mtl[i]:.4f}", f"{mtl_se[i]:.4f}", f"{100 * (mtl[i] / ind - 1):+.1f}%")
    console = Console()
    console.print(table)
    console.print(f"independent OLS (lambda -> 0):   {ind:.4f} ± {_se(results['independent'][:, None])[0]:.4f}")
    console.print(f"pooled OLS     (lambda -> inf): {pooled:.4f} ± {_se(results['pooled'][:, None])[0]:.4f}")
    console.print(f"true coefficients (noise floor): {oracle:.4f}")
    console.print(
        f"best lambda = {lambdas[best]:.3g} (theory: sigma^2/tau^2 = {NOISE_SD**2 / TASK_SD**2:.3g}): "
        f"MTL MSE {mtl[best]:.4f}, {100 * (1 - mtl[best] / ind):.1f}% below independent, "
        f"{100 * (1 - mtl[best] / pooled):.1f}% below pooled"
    )
    return best


def plot(lambdas: np.ndarray, results: dict[str, np.ndarray], best: int, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mtl, mtl_se = results["mtl"].mean(0), _se(results["mtl"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(lambdas, mtl, marker="o", markersize=3, color="C0", label="MTL (Evgeniou & Pontil)")
    ax.fill_between(lambdas, mtl - mtl_se, mtl + mtl_se, color="C0", alpha=0.2, linewidth=0)
    ax.axhline(results["independent"].mean(), color="C1", linestyle="--", label="independent OLS")
    ax.axhline(results["pooled"].mean(), color="C2", linestyle="--", label="pooled OLS")
    ax.axhline(results["oracle"].mean(), color="0.5", linestyle=":", label="true coefficients")
    ax.plot([lambdas[best]], [mtl[best]], marker="*", markersize=12, color="C3", linestyle="none",
            label=f"best lambda = {lambdas[best]:.3g}")
    ax.set_xscale("log")
    ax.set_xlabel("lambda (penalty on task deviations)")
    ax.set_ylabel("test MSE (mean over tasks)")
    seeds = results["mtl"].shape[0]
    ax.set_title(f"T=6 tasks, p=5, n=25 per task; mean ± s.e. over {seeds} seeds")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=20, help="independent draws to average over (default 20)")
    parser.add_argument("--out", type=Path, default=Path("outputs/linear_mtl.png"), help="where to write the plot")
    parser.add_argument("--points", type=int, default=30, help="lambda grid points on [1e-3, 1e4] (default 30)")
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.points < 2:
        parser.error("--seeds must be >= 1 and --points >= 2")
    torch.set_num_threads(1)  # hundreds of tiny solves: threads only add overhead
    lambdas = np.logspace(-3, 4, args.points)
    results = run(args.seeds, lambdas)
    best = print_table(lambdas, results)
    plot(lambdas, results, best, args.out)
    print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
