"""The controlled conflict experiment (docs/methods.md): per-step gradient cosines against alpha.

For each alpha, ``mtl-run dataset=controlled backbone=mlp dataset.alpha=<alpha>`` trains for
``--steps`` steps (one epoch of ``steps x batch_size`` samples, the trainer's default batch of
32) with the conflict diagnostics on every step (``diagnostics.every_n_steps=1``): the cosine
of the two tasks' gradients on the shared trunk, per step. The statistics are read back from
the run's own conflict report (``diagnostics.json``) and the per-step values from its
TensorBoard scalars ``cos/t1~t2``, the same outputs a user gets from ``mtl-run``; the runs
stay in ``--runs`` (``tensorboard --logdir outputs/conflict_sweep``).

    python scripts/conflict_sweep.py [--alphas 0 0.3 0.7 1] [--steps 100] [--seed 0]
        [--out outputs/conflict_sweep.png] [--runs outputs/conflict_sweep] [override ...]

Trailing arguments are extra ``mtl-run`` overrides (e.g. ``dataset.k=2 optimizer.lr=0.01``).
About 15 s for the four runs on a 2-core CPU.

The settings are docs/methods.md's and the project defaults: d = 64, k = 8, noise 0.01, 100 steps,
the 256-256 MLP trunk, AdamW at lr 2e-3 with the cosine schedule. They show the progression,
but the alpha = 1 end is not the "spike at +1" docs/methods.md predicts: with identical targets the
cosine starts near 0 (each task backpropagates through its own independently initialised
head, so the two trunk gradients are unrelated at step 0) and climbs to about 0.85-0.9 within
~30 steps, where it stays: even after 1000 steps the mean is 0.83. Two different heads fitting
the same targets keep sending different error signals into the trunk; only identical heads
would make the two gradients equal. Other settings move the plateau, not the conclusion
(alpha = 1, mean cosine over 100 steps at seed 0): k = 2: 0.88, k = 32: 0.59, lr 1e-2: 0.76,
lr 5e-4: 0.57, constant lr: 0.72, noise 0: 0.73, batch 128: 0.68. So the defaults are kept and
the table reports what they give.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table
from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

from mtl_runner.cli import CONF_DIR
from mtl_runner.runner import run_experiment

ALPHAS = (0.0, 0.3, 0.7, 1.0)
PAIR = "t1~t2"  # dataset=controlled's two tasks
#: Text-histogram bins over [-1, 1] and the block characters for 0..max counts.
SKETCH_BINS = 20
BLOCKS = " ▁▂▃▄▅▆▇█"


@dataclass
class AlphaResult:
    alpha: float
    cosines: np.ndarray  # one per step, in step order
    mean: float
    std: float
    frac_negative: float


def compose_run(alpha: float, steps: int, seed: int, overrides: Sequence[str] = ()) -> DictConfig:
    """mtl-run's config for one alpha: one epoch of exactly ``steps`` batches."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[
            "dataset=controlled", "backbone=mlp", f"dataset.alpha={alpha}", f"dataset.seed={seed}",
            f"trainer.seed={seed}", "trainer.epochs=1", "trainer.progress=off", "baseline=off",
            "diagnostics.every_n_steps=1", "diagnostics.warmup_steps=0", *overrides,
        ])
    cfg.dataset.num_train = steps * cfg.trainer.batch_size
    return cfg


def read_cosines(run_dir: Path) -> np.ndarray:
    """The run's per-step ``cos/t1~t2`` scalars from its TensorBoard events."""
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={SCALARS: 0})
    events.Reload()
    scalars = sorted(events.Scalars(f"cos/{PAIR}"), key=lambda e: e.step)
    return np.array([e.value for e in scalars])


def run_alpha(alpha: float, steps: int, seed: int, run_dir: Path, overrides: Sequence[str] = ()) -> AlphaResult:
    """Train one alpha into ``run_dir`` (replaced if it exists) and read its cosines back."""
    shutil.rmtree(run_dir, ignore_errors=True)  # a stale event file would add a second curve
    with contextlib.redirect_stdout(io.StringIO()):  # the run's own summary and report tables
        run_experiment(compose_run(alpha, steps, seed, overrides), run_dir)
    report = json.loads((run_dir / "diagnostics.json").read_text())["final"]["pairs"][PAIR]
    cosines = read_cosines(run_dir)
    if len(cosines) != report["steps"]:
        raise RuntimeError(f"{run_dir}: {len(cosines)} cos/{PAIR} scalars but the report counts {report['steps']} steps")
    return AlphaResult(alpha, cosines, report["mean"], report["std"], report["frac_negative"])


def sweep(alphas: Sequence[float], steps: int, seed: int, runs_dir: Path, overrides: Sequence[str] = ()) -> list[AlphaResult]:
    return [run_alpha(a, steps, seed, runs_dir / f"alpha_{a:g}", overrides) for a in alphas]


def sketch(cosines: np.ndarray, bins: int = SKETCH_BINS) -> str:
    """A one-line histogram over [-1, 1]: block height proportional to the bin's count."""
    counts, _ = np.histogram(np.clip(cosines, -1.0, 1.0), bins=bins, range=(-1.0, 1.0))
    top = max(1, int(counts.max()))
    levels = len(BLOCKS) - 1
    # Any non-empty bin shows at least the lowest block, so a lone step stays visible.
    return "".join(BLOCKS[0 if c == 0 else max(1, round(levels * c / top))] for c in counts)


def print_table(results: Sequence[AlphaResult], steps: int, seed: int, console: Console) -> None:
    table = Table(title=f"dataset=controlled: cos(g_t1, g_t2) on the shared trunk, {steps} steps, seed {seed}")
    for column in ("alpha", "mean cos", "std", "frac < 0"):
        table.add_column(column, justify="right")
    table.add_column(f"histogram, -1 … +1 ({SKETCH_BINS} bins)", justify="left")
    for r in results:
        table.add_row(f"{r.alpha:g}", f"{r.mean:+.3f}", f"{r.std:.3f}", f"{r.frac_negative:.0%}", f"│{sketch(r.cosines)}│")
    console.print(table)


def plot_histograms(results: Sequence[AlphaResult], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(3.2 * len(results), 3.0), sharex=True, squeeze=False)
    for ax, r in zip(axes[0], results):
        ax.hist(r.cosines, bins=40, range=(-1.0, 1.0), color="C0")
        ax.axvline(0.0, color="0.5", linewidth=0.8, linestyle=":")
        ax.set_title(f"alpha = {r.alpha:g}\nmean {r.mean:+.2f}, {r.frac_negative:.0%} < 0", fontsize=9)
        ax.set_xlabel("cos(g_t1, g_t2)")
    axes[0][0].set_ylabel("steps")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--alphas", type=float, nargs="+", default=list(ALPHAS), help="cos(W_1, W_2) values, in [-1, 1]")
    parser.add_argument("--steps", type=int, default=100, help="training steps per alpha (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="dataset and trainer seed (default 0)")
    parser.add_argument("--out", type=Path, default=Path("outputs/conflict_sweep.png"), help="the histograms' PNG")
    parser.add_argument("--runs", type=Path, default=Path("outputs/conflict_sweep"), help="run dirs, one per alpha (replaced)")
    parser.add_argument("overrides", nargs="*", help="extra mtl-run overrides, e.g. dataset.k=2")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be >= 2 (a spread needs two steps)")
    if any(not -1.0 <= a <= 1.0 for a in args.alphas):
        parser.error("--alphas must lie in [-1, 1]")
    torch.set_num_threads(1)  # a 64-256-256 MLP: extra threads only add overhead
    results = sweep(args.alphas, args.steps, args.seed, args.runs, args.overrides)
    print_table(results, args.steps, args.seed, Console())
    plot_histograms(results, args.out)
    print(f"histograms: {args.out}; runs: {args.runs} (tensorboard --logdir {args.runs})")


if __name__ == "__main__":
    main()
