"""Milliseconds per training step on the generated tagging corpus: uniform (no surgery)
against surgery methods in the features space (the token representations), each a run
built by ``mtl_runner.assemble.build_run`` exactly as ``mtl-run`` builds it.

Every method trains its own run from the same seed on the same fixed batches (padded to
their own length, as the trainer sees them); methods take turns in rounds, so a shared
machine's load hits all of them alike, and the table reports each method's median step
time and its ratio to uniform. What docs/text.md quotes as the wall-clock cost of a method.

    python scripts/bench_text.py                         # defaults: pcgrad, cagrad; 5 rounds x 10 steps
    python scripts/bench_text.py --methods pcgrad cagrad mgda --rounds 3 --steps 5 -- backbone.layers=4
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from mtl_runner.assemble import build_run
from mtl_runner.config import CONF_DIR

BASE = ["dataset=tagging_corpus", "backbone=transformer", "baseline=off", "diagnostics=off", "trainer.progress=off"]


def config(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides)


def main(argv: list[str] | None = None) -> list[str]:
    """Print the table; its lines are returned too."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["pcgrad", "cagrad"], help="surgery options besides uniform")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per method per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("overrides", nargs="*", help="more mtl-run overrides (after --)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    methods = ["none", *args.methods]
    runs = {}
    for method in methods:
        space = [] if method == "none" else ["surgery.space=features"]
        cfg = config([*BASE, f"surgery={method}", *space, f"trainer.num_threads={args.threads}", *args.overrides])
        runs[method] = build_run(cfg, None, diagnostics=False).trainer
    first = runs["none"]
    batches = list(first.taskset.train.batches(first.settings.batch_size, shuffle=True,
                                               generator=torch.Generator().manual_seed(0), device=first.device))
    needed = args.warmup + args.rounds * args.steps
    batches = (batches * (needed // len(batches) + 1))[:needed]

    times: dict[str, list[float]] = {m: [] for m in methods}
    for method in methods:
        for batch in batches[: args.warmup]:
            runs[method].train_step(batch)
    for round_index in range(args.rounds):
        start = args.warmup + round_index * args.steps
        for method in methods:
            for batch in batches[start : start + args.steps]:
                began = time.perf_counter()
                runs[method].train_step(batch)
                times[method].append(time.perf_counter() - began)

    uniform = statistics.median(times["none"])
    lines = [f"| method | ms / step (median of {args.rounds * args.steps}) | ratio to uniform |", "|---|---|---|"]
    for method in methods:
        median = statistics.median(times[method])
        name = "uniform" if method == "none" else f"{method} (features)"
        lines.append(f"| {name} | {1000 * median:.1f} | {median / uniform:.2f} |")
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
