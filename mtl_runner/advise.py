"""``mtl-advise``: the conflict report's advice, checked by a short screening before it is given.

The diagnostics' rule (:func:`mtl_runner.diagnostics.recommend`) reads gradient conflict and
loss scales and names what to try; that is a hypothesis. ``mtl-advise OVERRIDES...`` tests it:

1. a short ``balancer=uniform surgery=none`` run with the diagnostics on gives the rule's
   finding and its candidates (:func:`mtl_runner.diagnostics.rule_candidates`);
2. those candidates and the strong general choices (uniform; FAMO and DB-MTL, which do not
   depend on the losses' scales; PCGrad as a surgery) are each trained for ``--epochs`` epochs
   with ``--seeds`` seeds, single-task baselines per seed (cached, shared by all candidates);
3. they are ranked by validation Δm with 95% intervals and a paired t-test against uniform
   (:mod:`mtl_runner.seeds`), and the output ends in the command to run in full.

Nothing is recommended over uniform unless the screening measured it better; a candidate of
the rule that measured worse than uniform is named as such. Everything runs in this process
(one start-up for all runs); each run's files are under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig

from mtl_runner import io, seeds
from mtl_runner.config import CONF_DIR, validate
from mtl_runner.diagnostics import rule_candidates
from mtl_runner.errors import ConfigError
from mtl_runner.runner import run_experiment

REFERENCE: tuple[str, ...] = ("balancer=uniform", "surgery=none")
#: Strong general choices screened whatever the rule says.
GENERAL: tuple[tuple[str, ...], ...] = (REFERENCE, ("balancer=famo", "surgery=none"),
                                        ("balancer=dbmtl", "surgery=none"), ("balancer=uniform", "surgery=pcgrad"))


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


def screen(user: Sequence[str], epochs: int, seed_list: Sequence[int], out: Path) -> str:
    """Run the screening and return its report (Markdown)."""
    budget = [*user, f"trainer.epochs={epochs}", "trainer.progress=off", "baseline=on"]
    started = time.perf_counter()
    first = run_experiment(_compose([*budget, *REFERENCE, f"trainer.seed={seed_list[0]}"]),
                           out / "diagnose", run_name="diagnose")
    diagnostics = out / "diagnose" / "diagnostics.json"
    report = json.loads(diagnostics.read_text()) if diagnostics.is_file() else {}
    final = report.get("final", {})
    finding, advice = final.get("finding", "no diagnostics"), final.get("recommendation", "-")
    rule = [_complete(c) for c in rule_candidates(finding)]
    candidates = list(dict.fromkeys([*rule, *GENERAL]))
    groups: list[seeds.SeedGroup] = []
    for candidate in candidates:
        group = seeds.SeedGroup(label=_label(candidate), overrides=dict(i.split("=", 1) for i in candidate))
        for seed in seed_list:
            if candidate == REFERENCE and seed == seed_list[0]:
                results = first
            else:
                name = f"{_label(candidate).replace(' ', ',')},seed={seed}"
                results = run_experiment(_compose([*budget, *candidate, f"trainer.seed={seed}"]), out / name, run_name=name)
            group.jobs.append(str(seed))
            for field, store in (("val", group.val_delta_m), ("test", group.test_delta_m)):
                value = results[field].get("delta_m_pct")
                if value is not None:
                    store[str(seed)] = float(value)
        groups.append(group)
    reference = groups[candidates.index(REFERENCE)]
    summaries = seeds.summarise(groups, reference, "val")
    return _markdown(user, epochs, seed_list, finding, advice, rule, summaries, reference, time.perf_counter() - started)


def _markdown(user: Sequence[str], epochs: int, seed_list: Sequence[int], finding: str, advice: str,
              rule: list[tuple[str, ...]], summaries: list[seeds.Summary], reference: seeds.SeedGroup, seconds: float) -> str:
    heads = seeds.headers([], reference, "val")
    span = f"{epochs} epoch{'' if epochs == 1 else 's'}"
    lines = [f"# mtl-advise {' '.join(shlex.quote(u) for u in user)}", "",
             f"Diagnostics (uniform, {span}): **{finding}**; the rule suggests `{advice}`.", "",
             f"Screening: {len(summaries)} candidates x {len(seed_list)} seeds ({', '.join(map(str, seed_list))}), "
             f"{span} each, ranked by validation Δm (mean ± 95% t-interval), paired t-test against uniform; "
             f"{seconds / 60:.1f} min.", "",
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
        "and seeds, rank by validation Δm with intervals, and print the command to run in full."))
    parser.add_argument("overrides", nargs="*", help="mtl-run overrides that fix the problem (dataset=..., backbone=..., sizes)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per screening run (default 2)")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per candidate (default 2: 0 and 1)")
    parser.add_argument("--out", type=Path, default=Path("outputs/advise"), help="where the runs and advice.md go")
    args = parser.parse_args(argv)
    try:
        if args.epochs < 1 or args.seeds < 2:
            raise ConfigError("--epochs must be >= 1 and --seeds >= 2 (an interval needs two seeds)")
        for item in args.overrides:
            if item.split("=", 1)[0].lstrip("+~") in ("balancer", "surgery", "trainer.seed", "trainer.epochs", "baseline"):
                raise ConfigError(f"{item}: mtl-advise chooses balancer, surgery, seeds, epochs and baselines itself; "
                                  "give the problem (dataset, backbone, sharing, sizes) and --epochs/--seeds")
        _compose([*args.overrides, *REFERENCE])
        text = screen(args.overrides, args.epochs, list(range(args.seeds)), args.out)
    except ConfigError as exc:
        print(f"mtl-advise: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    io.write_text(args.out / "advice.md", text)
    print(text)


if __name__ == "__main__":
    main()
