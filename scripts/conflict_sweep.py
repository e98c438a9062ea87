"""The controlled conflict experiment (docs/methods.md): per-step gradient cosines against alpha.

For each alpha and each head setting, ``mtl-run dataset=controlled backbone=mlp
dataset.alpha=<alpha>`` trains for ``--steps`` steps (one epoch of ``steps x batch_size``
samples, the trainer's default batch of 32) with the conflict diagnostics on every step
(``diagnostics.every_n_steps=1``): the cosine of the two tasks' gradients on the shared
trunk, per step. The statistics are read back from the run's own conflict report
(``diagnostics.json``) and the per-step values from its TensorBoard scalars ``cos/t1~t2``,
the same outputs a user gets from ``mtl-run``; the runs stay in ``--runs``
(``tensorboard --logdir outputs/conflict_sweep``).

    python scripts/conflict_sweep.py [--alphas 0 0.3 0.7 1] [--steps 100] [--seed 0]
        [--heads tied independent] [--out outputs/conflict_sweep.png]
        [--runs outputs/conflict_sweep] [override ...]

Trailing arguments are extra ``mtl-run`` overrides (e.g. ``dataset.k=2 optimizer.lr=0.01``).
About 30 s for the eight runs on a 2-core CPU.

Heads. ``tied`` is the experiment as docs/methods.md specifies it: both tasks get a *linear*
head on the trunk, and both heads start from the *same* initialisation, so that only the
targets differ between the tasks; at alpha = 1 the two tasks are then the same task (up to
the target noise) and their trunk gradients coincide at every step. ``independent`` is what
``mtl-run`` itself builds: each task's own two-layer head, initialised independently. With
identical targets those heads still send different error signals into the trunk: the
cosine starts near 0 at step 0 and climbs to about 0.85-0.9 within ~30 steps (0.83 after
1000 steps), so alpha = 1 is no spike at +1 there. Both tables are in docs/diagnostics.md.

The settings are docs/methods.md's and the project defaults: d = 64, k = 8, noise 0.01, 100
steps, the 256-256 MLP trunk, AdamW at lr 2e-3 with the cosine schedule.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import copy
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

from torch import nn

from mtl_runner import build
from mtl_runner.assemble import build_run, prepare_process
from mtl_runner.cli import CONF_DIR
from mtl_runner.models.sharing.base import SharingModel

ALPHAS = (0.0, 0.3, 0.7, 1.0)
PAIR = "t1~t2"  # dataset=controlled's two tasks
HEADS = ("tied", "independent")
#: Text-histogram bins over [-1, 1] and the block characters for 0..max counts.
SKETCH_BINS = 20
BLOCKS = " ▁▂▃▄▅▆▇█"


@dataclass
class AlphaResult:
    alpha: float
    heads: str
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
    events = EventAccumulator(str(run_dir), size_guidance={SCALARS: 0})
    events.Reload()
    scalars = sorted(events.Scalars(f"cos/{PAIR}"), key=lambda e: e.step)
    return np.array([e.value for e in scalars])


def tie_linear_heads(model: SharingModel) -> None:
    """Give every task one linear head on the trunk's features, all copies of a single
    initialisation (``heads=tied``): the tasks then differ in their targets alone."""
    first_head = next(iter(model.heads.values()))
    outputs = first_head.mlp[-1].out_features
    template = nn.Linear(model.encoder.out_channels, outputs)
    for name in list(model.heads):
        model.heads[name] = copy.deepcopy(template)


def run_alpha(alpha: float, steps: int, seed: int, run_dir: Path, overrides: Sequence[str] = (),
              heads: str = "independent") -> AlphaResult:
    """Train one alpha into ``run_dir`` (replaced if it exists) and read its cosines back."""
    shutil.rmtree(run_dir, ignore_errors=True)  # a stale event file would add a second curve
    cfg = compose_run(alpha, steps, seed, overrides)
    prepare_process(cfg)
    taskset = build.build_taskset(cfg)
    torch.manual_seed(cfg.trainer.seed)
    model = build.build_model(cfg, taskset)
    if heads == "tied":
        tie_linear_heads(model)
    with contextlib.redirect_stdout(io.StringIO()):  # the run's own report tables
        run = build_run(cfg, run_dir, taskset=taskset, model=model)
        try:
            run.trainer.fit()
        finally:
            run.logger.close()
    report = json.loads((run_dir / "diagnostics.json").read_text())["final"]["pairs"][PAIR]
    cosines = read_cosines(run_dir)
    if len(cosines) != report["steps"]:
        raise RuntimeError(f"{run_dir}: {len(cosines)} cos/{PAIR} scalars but the report counts {report['steps']} steps")
    return AlphaResult(alpha, heads, cosines, report["mean"], report["std"], report["frac_negative"])


def sweep(alphas: Sequence[float], steps: int, seed: int, runs_dir: Path, overrides: Sequence[str] = (),
          heads: str = "independent") -> list[AlphaResult]:
    return [run_alpha(a, steps, seed, runs_dir / f"{heads}_alpha_{a:g}", overrides, heads) for a in alphas]


def sketch(cosines: np.ndarray, bins: int = SKETCH_BINS) -> str:
    """A one-line histogram over [-1, 1]: block height proportional to the bin's count."""
    counts, _ = np.histogram(np.clip(cosines, -1.0, 1.0), bins=bins, range=(-1.0, 1.0))
    top = max(1, int(counts.max()))
    levels = len(BLOCKS) - 1
    # Any non-empty bin shows at least the lowest block, so a lone step stays visible.
    return "".join(BLOCKS[0 if c == 0 else max(1, round(levels * c / top))] for c in counts)


def print_table(results: Sequence[AlphaResult], steps: int, seed: int, console: Console) -> None:
    table = Table(title=f"dataset=controlled, {results[0].heads} heads: cos(g_t1, g_t2) on the shared trunk, {steps} steps, seed {seed}")
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

    settings = list(dict.fromkeys(r.heads for r in results))  # one row per head setting
    rows = [[r for r in results if r.heads == heads] for heads in settings]
    cols = max(len(row) for row in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(3.2 * cols, 3.0 * len(rows)), sharex=True, squeeze=False)
    for row_axes, row in zip(axes, rows):
        for ax, r in zip(row_axes, row):
            ax.hist(r.cosines, bins=40, range=(-1.0, 1.0), color="C0")
            ax.axvline(0.0, color="0.5", linewidth=0.8, linestyle=":")
            ax.set_title(f"{r.heads}, alpha = {r.alpha:g}\nmean {r.mean:+.2f}, {r.frac_negative:.0%} < 0", fontsize=9)
            ax.set_xlabel("cos(g_t1, g_t2)")
        row_axes[0].set_ylabel("steps")
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
    parser.add_argument("--heads", nargs="+", choices=HEADS, default=list(HEADS), help="head settings to run (default both)")
    parser.add_argument("overrides", nargs="*", help="extra mtl-run overrides, e.g. dataset.k=2")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be >= 2 (a spread needs two steps)")
    if any(not -1.0 <= a <= 1.0 for a in args.alphas):
        parser.error("--alphas must lie in [-1, 1]")
    torch.set_num_threads(1)  # a 64-256-256 MLP: extra threads only add overhead
    results: list[AlphaResult] = []
    for heads in args.heads:
        results += sweep(args.alphas, args.steps, args.seed, args.runs, args.overrides, heads)
        print_table(results[-len(args.alphas):], args.steps, args.seed, Console())
    plot_histograms(results, args.out)
    print(f"histograms: {args.out}; runs: {args.runs} (tensorboard --logdir {args.runs})")

if __name__ == "__main__":
    main()
