"""``mtl-advise``: the conflict report's advice, checked by a short screening before it is given.

The diagnostics' rule (:func:`mtl_runner.diagnostics.recommend`) reads gradient conflict and
loss scales and names what to try; that is a hypothesis. ``mtl-advise OVERRIDES...`` tests it:

1. a short ``balancer=uniform surgery=none`` run without baselines, the diagnostics on every
   second step, gives the rule's finding and its candidates
   (:func:`mtl_runner.diagnostics.rule_candidates`), and times both kinds of step (with and
   without per-task gradients), the validation and a run's set-up;
2. from those timings :func:`plan_screening` sizes the screening to ``--budget`` minutes: the
   number of training batches per epoch (``trainer.max_batches_per_epoch``) that every run
   gets alike, so the baselines are shared and Δm compares like with like;
3. those candidates and the strong general choices (uniform; FAMO and DB-MTL, which do not
   depend on the losses' scales; PCGrad as a surgery) are each trained for ``--epochs`` epochs
   of that many batches with ``--seeds`` seeds, single-task baselines per seed (cached, shared
   by all candidates);
4. they are ranked by validation Δm with 95% intervals and a paired t-test against uniform
   (:mod:`mtl_runner.seeds`), and the output ends in the command to run in full.

Nothing is recommended over uniform unless the screening measured it better; a candidate of
the rule that measured worse than uniform is named as such. Everything runs in this process
(one start-up and one build of the data for all runs); each run's files are under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig

from mtl_runner import build, io, seeds
from mtl_runner.assemble import build_run, prepare_process
from mtl_runner.config import CONF_DIR, validate
from mtl_runner.data.base import TaskSet
from mtl_runner.diagnostics import rule_candidates
from mtl_runner.errors import ConfigError
from mtl_runner.runner import run_experiment
from mtl_runner.train.state import EvalResult, StepOutcome
from mtl_runner.train.trainer import Callback, Trainer

REFERENCE: tuple[str, ...] = ("balancer=uniform", "surgery=none")
#: Strong general choices screened whatever the rule says.
GENERAL: tuple[tuple[str, ...], ...] = (REFERENCE, ("balancer=famo", "surgery=none"),
                                        ("balancer=dbmtl", "surgery=none"), ("balancer=uniform", "surgery=pcgrad"))
#: Override keys the screening sets itself (``diagnostics.*`` too).
CHOSEN = ("balancer", "surgery", "trainer.seed", "trainer.epochs", "trainer.max_batches_per_epoch", "baseline", "diagnostics")


def _compose(overrides: Sequence[str]) -> DictConfig:
    """A checked config; an unknown option or a malformed override is one line."""
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=list(overrides))
    except HydraException as exc:
        raise ConfigError(str(exc).strip().splitlines()[0]) from None
    validate(cfg)
    return cfg


def _complete(candidate: Sequence[str]) -> tuple[str, ...]:
    """A candidate with both balancer and surgery named (in that order, then the rest), so
    every row says what it ran and the same choice found twice is screened once."""
    keys = {item.split("=", 1)[0] for item in candidate}
    items = [*candidate, *(item for item in REFERENCE if item.split("=", 1)[0] not in keys)]
    order = {"balancer": 0, "surgery": 1}
    return tuple(sorted(items, key=lambda item: order.get(item.split("=", 1)[0], 2)))


def _label(candidate: Sequence[str]) -> str:
    return " ".join(candidate)


#: The diagnose run: one epoch of at most this many batches, the conflicts read on every
#: second step, so that its steps time both kinds of step the screening will take.
DIAGNOSE_BATCHES = 40
#: The fewest batches per epoch of a screening run: fewer say little. A budget that cannot
#: give every run this many is refused (after the diagnose run, which measures what fits).
MIN_BATCHES = 10
#: The share of the budget left after the diagnose run that the plan fills; the rest is a margin
#: for the machine's load changing and for costs the plan does not price (FAMO's extra forward).
PLANNED_SHARE = 0.9


@dataclass(frozen=True)
class StepCosts:
    """Seconds measured on the diagnose run."""

    plain_step: float  #: a step of one backward pass (uniform and other loss-based balancers; a baseline)
    gradient_step: float  #: a step with per-task gradients (a surgery, DB-MTL, GradNorm; a diagnostics step)
    eval_example: float  #: evaluating one example
    run_setup: float  #: building one run (model, optimizer, logger)

    def __str__(self) -> str:
        return (f"measured {self.plain_step:.2f} s a step ({self.gradient_step:.2f} s with per-task gradients), "
                f"{1000 * self.eval_example:.1f} ms an evaluated example, {self.run_setup:.1f} s to set up a run")


@dataclass(frozen=True)
class Workload:
    """The trainings of the screening, each ``epochs`` epochs of ``full_batches`` batches uncapped."""

    plain_runs: int
    gradient_runs: int
    epochs: int
    full_batches: int
    eval_examples: int  #: per run: validation at each epoch's end, the final validation and the test set


@dataclass(frozen=True)
class Plan:
    batches: int  #: per epoch, for every candidate and baseline alike
    full_batches: int
    epochs: int
    trainings: int
    seconds: float  #: the trainings' estimated time
    fits: bool  #: False: the budget is too small even for MIN_BATCHES (``batches``)
    costs: StepCosts  #: what the estimate was made from

    @property
    def cap(self) -> int | None:
        """``trainer.max_batches_per_epoch`` (None: the whole epoch)."""
        return None if self.batches >= self.full_batches else self.batches

    def describe(self, budget_minutes: float, diagnose_seconds: float) -> str:
        per_run = (f"{self.epochs} epoch{'' if self.epochs == 1 else 's'} x " +
                   (f"all {self.full_batches} batches" if self.cap is None else
                    f"{self.batches} of {self.full_batches} batches ({100 * self.batches / self.full_batches:.0f}%)"))
        planned = (f"{self.trainings} trainings estimated at {self.seconds / 60:.1f} min after a {diagnose_seconds / 60:.1f} min "
                   f"diagnose run that {self.costs}")
        if not budget_minutes:
            return f"No budget (--budget 0): {per_run} per run; {planned}."
        if not self.fits:
            needed = math.ceil((diagnose_seconds + self.seconds / PLANNED_SHARE) / 60)
            return (f"--budget {budget_minutes:g} is too small here: the minimum screening, {per_run} per run, needs about "
                    f"{needed} min ({planned}); give --budget {needed}, or fewer --seeds or --epochs")
        return f"Budget {budget_minutes:g} min: {per_run} per run, every candidate and baseline alike; {planned}."


def plan_screening(seconds_left: float | None, costs: StepCosts, work: Workload) -> Plan:
    """The most batches per epoch that let every training of ``work`` end within
    ``PLANNED_SHARE`` of ``seconds_left`` (None: no budget, whole epochs), at least
    ``MIN_BATCHES`` and at most the whole epoch."""
    runs = work.plain_runs + work.gradient_runs
    fixed = runs * (costs.run_setup + work.eval_examples * costs.eval_example)
    per_batch = work.epochs * (work.plain_runs * costs.plain_step + work.gradient_runs * costs.gradient_step)
    least = min(MIN_BATCHES, work.full_batches)
    if seconds_left is None:
        affordable = work.full_batches
    else:
        affordable = math.floor((PLANNED_SHARE * seconds_left - fixed) / per_batch) if per_batch > 0 else work.full_batches
    batches = max(least, min(work.full_batches, affordable))
    return Plan(batches, work.full_batches, work.epochs, runs, fixed + per_batch * batches, affordable >= least, costs)


class _StepClock(Callback):
    """Wall-clock seconds of the diagnose run's steps, by kind, and of its validation."""

    def __init__(self) -> None:
        self.plain: list[float] = []
        self.gradient: list[float] = []
        self.validation: list[float] = []
        self._last = 0.0

    def _lap(self, trainer: Trainer) -> float:
        if trainer.device.type == "cuda":
            torch.cuda.synchronize(trainer.device)
        now = time.perf_counter()
        lap, self._last = now - self._last, now
        return lap

    def on_fit_start(self, trainer: Trainer) -> None:
        self._lap(trainer)

    def on_train_batch_end(self, trainer: Trainer, outcome: StepOutcome) -> None:
        (self.plain if outcome.grads.jacobian is None else self.gradient).append(self._lap(trainer))

    def on_eval(self, trainer: Trainer, split: str, result: EvalResult) -> None:
        if split == "val":
            self.validation.append(self._lap(trainer))

    def on_epoch_end(self, trainer: Trainer, epoch: int) -> None:
        self._lap(trainer)


def _diagnose(user: Sequence[str], taskset: TaskSet, seed: int, out: Path) -> tuple[dict[str, Any], StepCosts]:
    """The rule's reading (the final conflict report) from a short uniform run without
    baselines, and what its steps, validation and set-up cost."""
    cfg = _compose([*user, *REFERENCE, "trainer.progress=off", "baseline=off", "trainer.epochs=1",
                    f"trainer.max_batches_per_epoch={DIAGNOSE_BATCHES}", f"trainer.seed={seed}",
                    "diagnostics.every_n_steps=2", "diagnostics.dense_steps=0"])  # no dense phase: half the steps plain
    # The process's first optimizer pays one-time imports (seconds): not a run's set-up.
    build.optimizer_factory(cfg)([{"params": [torch.zeros(1, requires_grad=True)]}])
    clock = _StepClock()
    started = time.perf_counter()
    run = build_run(cfg, out / "diagnose", name="diagnose", taskset=taskset, callbacks=[clock])
    setup = time.perf_counter() - started
    try:
        run.trainer.fit()
    finally:
        run.logger.close()
    diagnostics = out / "diagnose" / "diagnostics.json"
    report = json.loads(diagnostics.read_text()).get("final", {}) if diagnostics.is_file() else {}
    # Medians: the first step of each kind (warm-ups) is not what the next hundreds cost.
    plain = statistics.median(clock.plain or clock.gradient)
    gradient = statistics.median(clock.gradient) if clock.gradient else plain
    return report, StepCosts(plain, gradient, clock.validation[0] / len(taskset.val), setup)


def _needs_task_gradients(cfg: DictConfig) -> bool:
    """Whether every step of ``cfg`` computes per-task gradients (priced as a diagnostics step)."""
    return build.build_surgery(cfg).needs_jacobian or build.build_balancer(cfg).requires_grads is not None


def screen(user: Sequence[str], epochs: int, seed_list: Sequence[int], out: Path, budget_minutes: float) -> str:
    """Run the screening within ``budget_minutes`` (0: whole epochs) and return its report (Markdown)."""
    started = time.perf_counter()
    common = [*user, f"trainer.epochs={epochs}", "trainer.progress=off", "baseline=on", "diagnostics=off"]
    reference_cfg = _compose([*common, *REFERENCE])
    prepare_process(reference_cfg)  # the user's trainer.num_threads already for building the data
    taskset = build.build_taskset(reference_cfg)  # once: every run of the screening trains on the same data
    final, costs = _diagnose(user, taskset, seed_list[0], out)
    diagnose_seconds = time.perf_counter() - started
    finding, advice = final.get("finding", "no diagnostics"), final.get("recommendation", "-")
    rule = [_complete(c) for c in rule_candidates(finding)]
    candidates = list(dict.fromkeys([*rule, *GENERAL]))
    gradient_runs = sum(_needs_task_gradients(_compose([*common, *c])) for c in candidates) * len(seed_list)
    baseline_runs = sum(not t.auxiliary for t in taskset.tasks) * len(seed_list)
    full_batches = max(1, math.ceil(len(taskset.train) / reference_cfg.trainer.batch_size))
    work = Workload(plain_runs=len(candidates) * len(seed_list) - gradient_runs + baseline_runs, gradient_runs=gradient_runs,
                    epochs=epochs, full_batches=full_batches,
                    eval_examples=(epochs + 1) * len(taskset.val) + len(taskset.test))
    plan = plan_screening(budget_minutes * 60 - diagnose_seconds if budget_minutes else None, costs, work)
    if not plan.fits:
        raise ConfigError(plan.describe(budget_minutes, diagnose_seconds))
    print(plan.describe(budget_minutes, diagnose_seconds), flush=True)
    budget = [*common, f"trainer.max_batches_per_epoch={plan.cap if plan.cap is not None else 'null'}"]
    groups: list[seeds.SeedGroup] = []
    total = len(candidates) * len(seed_list)
    for candidate in candidates:
        group = seeds.SeedGroup(label=_label(candidate), overrides=dict(i.split("=", 1) for i in candidate))
        for seed in seed_list:
            name = f"{_label(candidate).replace(' ', ',')},seed={seed}"
            run_started = time.perf_counter()
            results = run_experiment(_compose([*budget, *candidate, f"trainer.seed={seed}"]), out / name,
                                     run_name=name, taskset=taskset, quiet=True)  # one line per run instead
            group.jobs.append(str(seed))
            for field, store in (("val", group.val_delta_m), ("test", group.test_delta_m)):
                value = results[field].get("delta_m_pct")
                if value is not None:
                    store[str(seed)] = float(value)
            done = sum(len(g.jobs) for g in groups) + len(group.jobs)
            val = group.val_delta_m.get(str(seed))
            print(f"[{done}/{total}] {name}: validation Δm {'-' if val is None else f'{val:+.2f}%'} "
                  f"({time.perf_counter() - run_started:.0f} s, baselines included where trained)", flush=True)
        groups.append(group)
    reference = groups[candidates.index(REFERENCE)]
    summaries = seeds.summarise(groups, reference, "val")
    budget_line = f"{plan.describe(budget_minutes, diagnose_seconds)} The whole screening took {(time.perf_counter() - started) / 60:.1f} min."
    diagnosed = f"uniform, {min(DIAGNOSE_BATCHES, full_batches)} batches, conflicts read on every second step"
    return _markdown(user, seed_list, (diagnosed, finding, advice), rule, summaries, reference, budget_line)


def _markdown(user: Sequence[str], seed_list: Sequence[int], diagnosis: tuple[str, str, str], rule: list[tuple[str, ...]],
              summaries: list[seeds.Summary], reference: seeds.SeedGroup, budget_line: str) -> str:
    """``diagnosis``: how the diagnose run read the conflicts, the rule's finding, its advice."""
    diagnosed, finding, advice = diagnosis
    heads = seeds.headers([], reference, "val")
    lines = [f"# mtl-advise {' '.join(shlex.quote(u) for u in user)}", "",
             f"Diagnostics ({diagnosed}): **{finding}**; the rule suggests `{advice}`.", "", budget_line, "",
             f"Screening: {len(summaries)} candidates x {len(seed_list)} seeds ({', '.join(map(str, seed_list))}), "
             "ranked by validation Δm (mean ± 95% t-interval), paired t-test against uniform.", "",
             "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    lines += ["| " + " | ".join(seeds.cells(s, [], reference)) + " |" for s in summaries]
    lines += ["", seeds.conclusion(summaries, reference, "val")]
    for s in summaries:
        if tuple(s.group.label.split()) in rule and s.group is not reference and s.comparison is not None \
                and s.comparison.difference.mean < 0:
            lines.append(f"The rule's candidate `{s.group.label}` measured worse than uniform here "
                         f"({s.comparison.difference} points of validation Δm, {s.comparison.verdict}).")
    best = next((s for s in summaries if s.comparison is not None and s.comparison.verdict == "better"), None)
    chosen = best.group if best is not None else reference
    why = ("it beat uniform significantly in the screening" if best is not None
           else "no candidate beat uniform significantly in the screening")
    command = " ".join(["mtl-run -m", *map(shlex.quote, user), *chosen.label.split(), "trainer.seed=0,1,2"])
    lines += ["", f"Run in full ({why}; three seeds, then `mtl-report` for intervals):", "", f"    {command}", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mtl-advise", description=(
        "Check the conflict report's advice: screen its candidates and the strong general choices for a few epochs "
        "and seeds within a time budget, rank by validation Δm with intervals, and print the command to run in full."))
    parser.add_argument("overrides", nargs="*", help="mtl-run overrides that fix the problem (dataset=..., backbone=..., sizes)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per screening run (default 2)")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per candidate (default 2: 0 and 1)")
    parser.add_argument("--budget", type=float, default=10.0, metavar="MINUTES",
                        help="minutes for the whole screening, diagnose run included (default 10; 0: no budget, whole epochs)")
    parser.add_argument("--out", type=Path, default=Path("outputs/advise"), help="where the runs and advice.md go")
    args = parser.parse_args(argv)
    try:
        if args.epochs < 1 or args.seeds < 2 or not args.budget >= 0:
            raise ConfigError("--epochs must be >= 1, --seeds >= 2 (an interval needs two seeds) and --budget >= 0 minutes")
        for item in args.overrides:
            key = item.split("=", 1)[0].lstrip("+~")
            if key in CHOSEN or key.startswith("diagnostics."):
                raise ConfigError(f"{item}: mtl-advise chooses balancer, surgery, seeds, epochs, batches, baselines and "
                                  "diagnostics itself; give the problem (dataset, backbone, sharing, sizes) and --epochs/--seeds/--budget")
        _compose([*args.overrides, *REFERENCE])
        text = screen(args.overrides, args.epochs, list(range(args.seeds)), args.out, args.budget)
    except ConfigError as exc:
        print(f"mtl-advise: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    io.write_text(args.out / "advice.md", text)
    print(text)


if __name__ == "__main__":
    main()
