"""The task-subset estimator (``surgery.task_subset=k``, docs/methods.md#task-subsets)
against the exact method on bench_steps' ``mlp40`` workload (MLP 256-512-512-256, batch
256, 40 linear heads): how far its direction is from the exact one, what a step costs,
and where training ends.

- **Error**: on ``--batches`` batches, at initialisation and after ``--pretrain`` plain
  AdamW steps, the exact direction ``d`` (every task's row) and ``--draws`` estimates per
  ``k`` (``sampled_direction`` on the rows of the drawn tasks, what the engine computes
  on a task-subset step); medians of the cosine between estimate and ``d`` and of the
  relative error ``||estimate - d|| / ||d||``. The ``sum`` row is ``none``'s weights as a
  row weighting: the estimator is unbiased there, so its error is the sampling noise
  alone.
- **Cost**: median ms per training step (the engine's step, as bench_steps times it),
  plain step, exact method and each ``k`` side by side in one process, taking turns.
- **Training** (``--train-steps`` > 0): final mean training loss over the last 10 steps
  of exact vs ``--train-k``, per seed, from the same initial weights and batches.

The workload's targets are bench_steps' pure noise for timing; for error and training the
batches get targets that the inputs explain (a shared random teacher, 16 features, each
task its own readout, plus noise), so that training changes the gradients' geometry.

    python -m scripts.bench_task_subset                          # docs/performance.md's table
    python -m scripts.bench_task_subset --quick                  # smaller: a smoke reading
    python -m scripts.bench_task_subset --methods upgrad --subsets 8 --train-steps 0
"""

from __future__ import annotations

import argparse
import copy
import statistics
from collections.abc import Callable

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table
from torch import Tensor

from mtl_runner.config import CONF_DIR
from mtl_runner.optim.balancers.uniform import Uniform
from mtl_runner.optim.jacobian import GradientEngine
from mtl_runner.optim.surgery.base import GramianWeighting
from scripts.bench_steps import Column, Workload, median, mlp, plain_column, task_losses, timed

Batch = tuple[Tensor, list[Tensor]]


class Sum(GramianWeighting):
    """``none``'s weights (ones) as a row weighting that allows subsets: the estimator's
    unbiased case, so its error row is the sampling noise alone."""

    def solve(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        return torch.ones(gramian.shape[0], dtype=gramian.dtype, device=gramian.device)


def make_surgery(name: str, task_subset: int | None, num_tasks: int, seed: int) -> GramianWeighting:
    if name == "sum":
        surgery: GramianWeighting = Sum(task_subset=task_subset)
    else:
        surgery = instantiate(OmegaConf.load(CONF_DIR / "surgery" / f"{name}.yaml"), task_subset=task_subset)
    surgery.setup(num_tasks, torch.Generator().manual_seed(seed))
    return surgery


def teacher_batches(workload: Workload, count: int, seed: int) -> list[Batch]:
    """Batches shaped like the workload's, whose targets the inputs explain."""
    generator = torch.Generator().manual_seed(seed)
    x0, _ = workload.batch
    features = torch.randn(x0.shape[1], 16, generator=generator) / x0.shape[1] ** 0.5
    readouts = torch.randn(16, workload.num_tasks, generator=generator)
    batches = []
    for _ in range(count):
        x = torch.randn(x0.shape, generator=generator)
        y = torch.tanh(x @ features) @ readouts + 0.5 * torch.randn(x0.shape[0], workload.num_tasks, generator=generator)
        batches.append((x.to(x0.device), [y[:, t : t + 1].to(x0.device) for t in range(workload.num_tasks)]))
    return batches


def with_batch(workload: Workload, batch: Batch) -> Workload:
    return Workload(workload.name, workload.model, batch, workload.losses)


def pretrain(workload: Workload, batches: list[Batch], steps: int) -> None:
    """Plain AdamW steps on the summed loss (the same trained state for every method)."""
    optimizer = torch.optim.AdamW(workload.model.parameters(), lr=1e-3)
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        x, _ = batches[step % len(batches)]
        task_losses(with_batch(workload, batches[step % len(batches)]), workload.model(x)).sum().backward()
        optimizer.step()


def jacobian(workload: Workload, batch: Batch) -> Tensor:
    """Every task's row of the shared parameters (the engine's own passes)."""
    model = workload.model
    balancer = Uniform()
    balancer.setup(model.tasks, None)
    engine = GradientEngine(model, balancer, make_surgery("sum", None, workload.num_tasks, 0), "sequential")
    losses = task_losses(with_batch(workload, batch), engine.forward(batch[0]))
    model.zero_grad(set_to_none=True)
    rows = engine.backward(losses, torch.ones_like(losses), need_jacobian=True).jacobian
    model.zero_grad(set_to_none=True)
    assert rows is not None
    return rows


def errors(
    workload: Workload, batches: list[Batch], methods: list[str], subsets: list[int], draws: int
) -> dict[tuple[str, int], tuple[list[float], list[float]]]:
    """Per (method, k): cosines and relative errors of the estimates against the exact
    direction, over batches and draws."""
    num_tasks = workload.num_tasks
    found: dict[tuple[str, int], tuple[list[float], list[float]]] = {(m, k): ([], []) for m in methods for k in subsets}
    estimators = {(m, k): make_surgery(m, k, num_tasks, seed=k) for m in methods for k in subsets}
    exact_methods = {m: make_surgery(m, None, num_tasks, seed=0) for m in methods}
    for batch in batches:
        rows = jacobian(workload, batch)
        for method in methods:
            exact = exact_methods[method](rows).double()
            for k in subsets:
                estimator = estimators[method, k]
                cosines, relative = found[method, k]
                for _ in range(draws):
                    subset = estimator.sample_tasks(num_tasks)
                    assert subset is not None
                    estimate = estimator.sampled_direction(rows[subset], subset, num_tasks).double()
                    cosines.append(float(torch.nn.functional.cosine_similarity(estimate, exact, dim=0)))
                    relative.append(float((estimate - exact).norm() / exact.norm()))
    return found


def engine_step(workload: Workload, surgery: GramianWeighting, lr: float = 1e-4) -> Callable[[], Tensor]:
    """A training step through the engine on the workload's (current) batch, with AdamW:
    what mtl-run's trainer does around the engine. Returns the step's losses."""
    model = workload.model
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    balancer = Uniform()
    balancer.setup(model.tasks, None)
    engine = GradientEngine(model, balancer, surgery, "sequential")

    def step() -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        losses = task_losses(workload, engine.forward(workload.batch[0]))
        engine.backward(losses, balancer.weights(losses))
        optimizer.step()
        return losses.detach()

    return step


def timings(workload: Workload, methods: list[str], subsets: list[int], warmup: int, rounds: int) -> dict[str, float]:
    """Median ms per step: plain, each exact method, each k; the columns take turns."""
    columns = [plain_column(workload)]
    for method in methods:
        for k in [None, *subsets]:
            copied = Workload(workload.name, copy.deepcopy(workload.model), workload.batch, workload.losses)
            step = engine_step(copied, make_surgery(method, k, workload.num_tasks, seed=1))
            columns.append(Column(f"{method} k={k}" if k else f"{method} exact", step))
    device = workload.batch[0].device
    for column in columns:
        for _ in range(warmup):
            timed(column, device, record=False)
    for _ in range(rounds):
        for column in columns:
            timed(column, device, record=True)
    return {column.name: median(column) for column in columns}


def train(workload: Workload, batches: list[Batch], method: str, k: int | None, steps: int, seed: int) -> float:
    """Mean training loss (sum over tasks / T) over the last 10 of ``steps`` engine steps."""
    torch.manual_seed(seed)
    fresh = mlp(workload.num_tasks, workload.batch[0].device)
    current = Workload(workload.name, fresh.model, batches[0], workload.losses)
    step = engine_step(current, make_surgery(method, k, workload.num_tasks, seed=seed), lr=1e-3)
    last: list[float] = []
    for index in range(steps):
        current.batch = batches[index % len(batches)]
        losses = step()
        if index >= steps - 10:
            last.append(float(losses.mean()))
    return statistics.fmean(last)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["upgrad", "pcgrad", "mgda"])
    parser.add_argument("--subsets", nargs="+", type=int, default=[4, 8, 16, 32], help="values of k")
    parser.add_argument("--batches", type=int, default=50, help="batches for the error, per state")
    parser.add_argument("--draws", type=int, default=2, help="subsets drawn per batch and k")
    parser.add_argument("--pretrain", type=int, default=300, help="plain steps before the second error reading")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per timing column")
    parser.add_argument("--rounds", type=int, default=8, help="timed steps per column (taking turns)")
    parser.add_argument("--train-steps", type=int, default=150, help="engine steps of the training comparison (0: skip)")
    parser.add_argument("--train-k", type=int, default=8)
    parser.add_argument("--train-method", default="upgrad")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="10 batches, 100 plain steps, 3 rounds, 40 training steps, 2 seeds")
    args = parser.parse_args()
    if args.quick:
        args.batches, args.pretrain, args.rounds, args.train_steps, args.seeds = 10, 100, 3, 40, args.seeds[:2]
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    console = Console(width=132)
    device = torch.device("cpu")
    torch.manual_seed(0)
    workload = mlp(40, device)
    batches = teacher_batches(workload, args.batches, seed=0)
    methods = ["sum", *args.methods]
    console.print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; T = {workload.num_tasks}, "
                  f"{args.batches} batches x {args.draws} draws per k")

    table = Table(title="estimate vs exact direction: median cosine / median relative error")
    table.add_column("method")
    for k in args.subsets:
        table.add_column(f"k={k} init")
        table.add_column(f"k={k} trained")
    readings = [errors(workload, batches, methods, args.subsets, args.draws)]
    pretrain(workload, batches, args.pretrain)
    readings.append(errors(workload, batches, methods, args.subsets, args.draws))
    for method in methods:
        cells = []
        for k in args.subsets:
            for reading in readings:
                cosines, relative = reading[method, k]
                cells.append(f"{statistics.median(cosines):.3f} / {statistics.median(relative):.2f}")
        table.add_row(method, *cells)
    console.print(table)

    times = timings(workload, args.methods, args.subsets, args.warmup, args.rounds)
    plain = times["plain"]
    cost = Table(title=f"median ms per step ({args.rounds} timed steps per column, taking turns)")
    for name in ("column", "ms", "x plain"):
        cost.add_column(name)
    for name, ms in times.items():
        cost.add_row(name, f"{ms:.1f}", f"{ms / plain:.2f}")
    console.print(cost)

    if args.train_steps > 0:
        trained = Table(title=f"{args.train_method}: mean training loss over the last 10 of {args.train_steps} steps")
        for name in ("seed", "exact", f"k={args.train_k}"):
            trained.add_column(name)
        for seed in args.seeds:
            exact = train(workload, batches, args.train_method, None, args.train_steps, seed)
            estimated = train(workload, batches, args.train_method, args.train_k, args.train_steps, seed)
            trained.add_row(str(seed), f"{exact:.4f}", f"{estimated:.4f}")
        console.print(trained)


if __name__ == "__main__":
    main()
