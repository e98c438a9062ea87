"""Do uncertainty and GradNorm bring the built-in dataset's loss scales within 10x?

``dataset=synthetic_scenes`` (mtl-run's default) has a depth loss (squared error in metres) one
to two orders of magnitude above the segmentation and count cross-entropies. This trains
``balancer=uniform``, ``uncertainty`` and ``gradnorm`` with the same seed and budget (mtl-run's
defaults otherwise: small_cnn, hard sharing, AdamW at 2e-3 with the cosine schedule, batch 32,
2000 images; ``baseline=off diagnostics=off``) and, per balancer and task, prints over the last epoch: the mean raw loss,
the mean weight, the mean weighted loss (per step ``w_t L_t``, the term the optimizer sees),
and the max/min ratio of the weighted losses across tasks with "within 10x: yes/no".
Everything is read from what each run writes: its TensorBoard scalars ``loss/train/<task>``
and ``weight/<task>``, logged every step (``trainer.log_every_n_steps=1``).

    python scripts/balancer_scales.py [--epochs 4] [--image-size 32] [--num-train 2000] [--seed 0]
        [--balancers uniform uncertainty gradnorm] [--runs outputs/balancer_scales] [override ...]

Trailing arguments are extra ``mtl-run`` overrides for every run (e.g. ``balancer.lr=0.05``
applies to the balancers that have an ``lr``; give per-balancer settings with separate runs).

Budget: 4 epochs (252 steps) of 32x32 images, about 2 minutes per balancer on a 2-core CPU
shared with other jobs (9 minutes in all; 64x32 images cost about 4x). The losses are
per-pixel means and depth is in metres, so the image size does not set the loss scales; the
per-epoch ratios show the weights have settled by epoch 2 (seed 0, max/min weighted loss per
epoch: uniform 24.2, 9.2, 9.0, 9.0; uncertainty 12.6, 4.9, 4.9, 4.9; gradnorm 11.6, 37.4,
24.4, 20.5). What that run shows: the premise holds only early (depth 24x seg in epoch 1,
9x from epoch 2 on under uniform); uncertainty brings the ratio to 4.9x; gradnorm does not
reach 10x: it equalises gradient norms on the last shared layer, and depth's are so much
larger that its weight falls to ~0.004, leaving depth under-trained (raw loss 13.6 against
5.6) and its weighted loss 20x below count's.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table
from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

from mtl_runner.cli import CONF_DIR
from mtl_runner.runner import run_experiment

BALANCERS = ("uniform", "uncertainty", "gradnorm")
#: The issue's bar: weighted losses within this factor of each other.
WITHIN = 10.0


@dataclass
class TaskScale:
    loss: float  # mean raw loss over the last epoch
    weight: float  # mean balancer weight over the last epoch
    weighted: float  # mean of w_t * L_t over the last epoch's steps


@dataclass
class BalancerScales:
    balancer: str
    tasks: dict[str, TaskScale]

    @property
    def ratio(self) -> float:
        """max_t / min_t of the weighted losses (inf when one is 0)."""
        values = [s.weighted for s in self.tasks.values()]
        return max(values) / min(values) if min(values) > 0 else float("inf")


def compose_run(balancer: str, epochs: int, num_train: int, image_size: int, seed: int,
                overrides: Sequence[str] = ()) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[
            f"balancer={balancer}", f"trainer.epochs={epochs}", f"dataset.num_train={num_train}",
            f"dataset.image_size={image_size}",
            f"trainer.seed={seed}", "trainer.log_every_n_steps=1", "trainer.progress=off",
            "baseline=off", "diagnostics=off", *overrides,
        ])


def read_last_epoch(run_dir: Path, task_names: Sequence[str], steps_per_epoch: int) -> dict[str, TaskScale]:
    """Per task, the last epoch's means of ``loss/train/<task>``, ``weight/<task>`` and their product."""
    events = EventAccumulator(str(run_dir), size_guidance={SCALARS: 0})
    events.Reload()

    def last_epoch(tag: str) -> np.ndarray:
        by_step = {e.step: e.value for e in events.Scalars(tag)}
        steps = sorted(by_step)[-steps_per_epoch:]
        return np.array([by_step[s] for s in steps])

    scales = {}
    for name in task_names:
        loss, weight = last_epoch(f"loss/train/{name}"), last_epoch(f"weight/{name}")
        if len(loss) != steps_per_epoch or len(weight) != steps_per_epoch:
            raise RuntimeError(f"{run_dir}: expected {steps_per_epoch} steps of loss/weight for {name}, got {len(loss)}/{len(weight)}")
        scales[name] = TaskScale(float(loss.mean()), float(weight.mean()), float((loss * weight).mean()))
    return scales


def run_balancer(balancer: str, epochs: int, num_train: int, image_size: int, seed: int, run_dir: Path,
                 overrides: Sequence[str] = ()) -> BalancerScales:
    """Train one balancer into ``run_dir`` (replaced if it exists) and read its scales back."""
    cfg = compose_run(balancer, epochs, num_train, image_size, seed, overrides)
    shutil.rmtree(run_dir, ignore_errors=True)  # a stale event file would mix two runs' steps
    with contextlib.redirect_stdout(io.StringIO()):  # the run's own summary table
        out = run_experiment(cfg, run_dir)
    task_names = list(out["tasks"])
    steps_per_epoch = out["steps"] // out["epochs"]
    return BalancerScales(balancer, read_last_epoch(run_dir, task_names, steps_per_epoch))


def sweep(balancers: Sequence[str], epochs: int, num_train: int, image_size: int, seed: int, runs_dir: Path,
          overrides: Sequence[str] = ()) -> list[BalancerScales]:
    return [run_balancer(b, epochs, num_train, image_size, seed, runs_dir / b, overrides) for b in balancers]


def print_table(results: Sequence[BalancerScales], title: str, console: Console) -> None:
    table = Table(title=title)
    table.add_column("balancer", no_wrap=True)
    table.add_column("task")
    for column in ("raw loss", "weight", "weighted", "max/min", f"within {WITHIN:g}x"):
        table.add_column(column, justify="right")
    for r in results:
        for i, (name, s) in enumerate(r.tasks.items()):
            last = i == len(r.tasks) - 1
            table.add_row(
                r.balancer if i == 0 else "", name, f"{s.loss:.4g}", f"{s.weight:.4g}", f"{s.weighted:.4g}",
                f"{r.ratio:.1f}x" if i == 0 else "", ("yes" if r.ratio <= WITHIN else "no") if i == 0 else "",
                end_section=last,
            )
    console.print(table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--balancers", nargs="+", default=list(BALANCERS), help="balancer options to compare")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per run (default 4; mtl-run's: 8)")
    parser.add_argument("--image-size", type=int, default=32, help="image side (default 32; mtl-run's: 64)")
    parser.add_argument("--num-train", type=int, default=2000, help="training images (mtl-run's default: 2000)")
    parser.add_argument("--seed", type=int, default=0, help="trainer seed (default 0)")
    parser.add_argument("--runs", type=Path, default=Path("outputs/balancer_scales"), help="run dirs, one per balancer (replaced)")
    parser.add_argument("overrides", nargs="*", help="extra mtl-run overrides for every run")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.num_train < 1:
        parser.error("--epochs and --num-train must be >= 1")
    results = sweep(args.balancers, args.epochs, args.num_train, args.image_size, args.seed, args.runs, args.overrides)
    title = (f"last-epoch loss scales on synthetic_scenes ({args.epochs} epochs x {args.num_train} images "
             f"of {args.image_size}px, seed {args.seed})")
    print_table(results, title, Console())
    print(f"runs: {args.runs} (tensorboard --logdir {args.runs})")


if __name__ == "__main__":
    main()
