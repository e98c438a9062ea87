"""``mtl-report`` over seeds: jobs that differ only by ``trainer.seed`` are one configuration.

Per configuration: the mean and a 95% confidence interval of each task's mean delta and of Δm
(validation and test), over its seeds, and against a reference configuration (``uniform``
without surgery by default) whether the difference in Δm is significant.

Why a t-interval: a sweep has two to five seeds, too few for a bootstrap (three values give
ten distinct resamples, and its percentile interval is then narrower than the data's spread);
the t-distribution widens the interval for the small sample, on the usual assumption that
the seed-to-seed noise of an average of many test examples is roughly normal.

Why a paired t-test over seeds: a seed fixes the initial weights and the batch order of both
configurations alike (and their baselines), so the per-seed differences remove the part of
the noise the two share. A sign-flip permutation test would need no normality but cannot
reach p < 0.05 with fewer than six seeds (its smallest p with three is 0.25), so it could never
say "better" at the seed counts a sweep can afford.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from scipy import stats

#: Confidence level of the intervals and the significance level of the tests.
LEVEL = 0.95
SEED_KEY = "trainer.seed"


@dataclass(frozen=True)
class Estimate:
    """Mean of per-seed values and the half-width of its 95% t-interval (None with one seed)."""

    mean: float
    half_width: float | None
    n: int

    def __str__(self) -> str:
        return f"{self.mean:+.2f}" + ("" if self.half_width is None else f" ± {self.half_width:.2f}")


def estimate(values: Sequence[float]) -> Estimate | None:
    """Mean and t-interval of ``values`` (finite ones); None when there are none."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return None
    n = len(finite)
    mean = sum(finite) / n
    if n < 2:
        return Estimate(mean, None, n)
    sd = math.sqrt(sum((v - mean) ** 2 for v in finite) / (n - 1))
    return Estimate(mean, float(stats.t.ppf(0.5 + LEVEL / 2, n - 1)) * sd / math.sqrt(n), n)


@dataclass(frozen=True)
class Comparison:
    """A configuration against the reference on the seeds both have."""

    difference: Estimate  # mean (and interval) of the per-seed differences, config - reference
    p_value: float | None

    @property
    def verdict(self) -> str:
        if self.p_value is None:
            return "too few paired seeds"
        if self.p_value >= 1 - LEVEL:
            return "no significant difference"
        return "better" if self.difference.mean > 0 else "worse"


def paired_comparison(values: dict[str, float], reference: dict[str, float]) -> Comparison | None:
    """Paired t-test over the seeds present in both (seed -> value); None without any."""
    seeds = sorted(s for s in values.keys() & reference.keys()
                   if math.isfinite(values[s]) and math.isfinite(reference[s]))
    if not seeds:
        return None
    differences = [values[s] - reference[s] for s in seeds]
    difference = estimate(differences)
    assert difference is not None
    if len(seeds) < 2:
        return Comparison(difference, None)
    if all(d == differences[0] for d in differences):  # no spread: the t statistic is undefined
        return Comparison(difference, 0.0 if differences[0] != 0 else 1.0)
    return Comparison(difference, float(stats.ttest_rel([values[s] for s in seeds], [reference[s] for s in seeds]).pvalue))


@dataclass
class SeedGroup:
    """The completed jobs of one configuration, by seed."""

    label: str
    overrides: dict[str, str]
    jobs: list[str] = field(default_factory=list)
    val_delta_m: dict[str, float] = field(default_factory=dict)
    test_delta_m: dict[str, float] = field(default_factory=dict)
    task_deltas: dict[str, dict[str, float]] = field(default_factory=dict)  # task -> seed -> mean Δ%
    choices: dict[str, str] = field(default_factory=dict)

    @property
    def seeds(self) -> list[str]:
        return sorted(set(self.val_delta_m) | set(self.test_delta_m), key=lambda s: (len(s), s))


class JobLike(Protocol):
    """What grouping reads of one ``mtl-report`` row (:class:`mtl_runner.report.JobRow`)."""

    name: str
    status: str
    overrides: dict[str, str]
    task_deltas: dict[str, float | None]
    delta_m: float | None
    val_delta_m: float | None
    seed: str | None
    choices: dict[str, str]


def group_rows(rows: Sequence[JobLike]) -> list[SeedGroup]:
    """Completed jobs grouped by their overrides other than the seed, in first-seen order;
    a group is labelled by the overrides that differ between groups."""
    by_key: dict[tuple[tuple[str, str], ...], SeedGroup] = {}
    for row in rows:
        if row.status != "completed":
            continue
        config = {k: v for k, v in row.overrides.items() if k != SEED_KEY}
        key = tuple(sorted(config.items()))
        group = by_key.setdefault(key, SeedGroup(label="", overrides=config, choices=dict(row.choices)))
        seed = row.seed if row.seed is not None else row.name
        group.jobs.append(row.name)
        if row.val_delta_m is not None:
            group.val_delta_m[seed] = row.val_delta_m
        if row.delta_m is not None:
            group.test_delta_m[seed] = row.delta_m
        for task, value in row.task_deltas.items():
            if value is not None:
                group.task_deltas.setdefault(task, {})[seed] = value
    groups = list(by_key.values())
    varying = [k for k in dict.fromkeys(k for g in groups for k in g.overrides)
               if len({g.overrides.get(k) for g in groups}) > 1]
    for group in groups:
        group.label = " ".join(f"{k}={group.overrides[k]}" for k in varying if k in group.overrides) or "(defaults)"
    return groups


def default_reference(groups: Sequence[SeedGroup]) -> SeedGroup | None:
    """``balancer=uniform`` with ``surgery=none``: plain summed losses, what every method
    claims to improve on."""
    return next((g for g in groups if g.choices.get("balancer") == "uniform" and g.choices.get("surgery", "none") == "none"), None)


@dataclass(frozen=True)
class Summary:
    group: SeedGroup
    val: Estimate | None
    test: Estimate | None
    tasks: dict[str, Estimate | None]
    comparison: Comparison | None


def summarise(groups: Sequence[SeedGroup], reference: SeedGroup | None, rank_on: str) -> list[Summary]:
    """Each group's estimates and its comparison with ``reference`` on ``rank_on`` Δm
    (``val`` or ``test``), best mean first."""
    def values(group: SeedGroup) -> dict[str, float]:
        return group.val_delta_m if rank_on == "val" else group.test_delta_m

    out = [Summary(g, estimate(list(g.val_delta_m.values())), estimate(list(g.test_delta_m.values())),
                   {t: estimate(list(v.values())) for t, v in g.task_deltas.items()},
                   None if reference is None or g is reference else paired_comparison(values(g), values(reference)))
           for g in groups]
    ranked = [s for s in out if (s.val if rank_on == "val" else s.test) is not None]
    ranked.sort(key=lambda s: -(s.val if rank_on == "val" else s.test).mean)  # type: ignore[union-attr]
    return ranked + [s for s in out if s not in ranked]


def headers(tasks: Sequence[str], reference: SeedGroup | None, rank_on: str) -> list[str]:
    ref = f" vs {reference.label}" if reference is not None else ""
    return ["configuration", "seeds", *[f"Δ{t} % (test)" for t in tasks], "Δm val %", "Δm test %",
            f"Δ({rank_on} Δm){ref}", "p (paired t)", "verdict"]


def cells(summary: Summary, tasks: Sequence[str], reference: SeedGroup | None) -> list[str]:
    def show(value: Estimate | None) -> str:
        return "-" if value is None else str(value)

    comparison = summary.comparison
    if summary.group is reference:
        versus, p, verdict = "-", "-", "reference"
    elif comparison is None:
        versus, p, verdict = "-", "-", "no shared seeds" if reference is not None else "-"
    else:
        versus = str(comparison.difference)
        p = "-" if comparison.p_value is None else f"{comparison.p_value:.3f}"
        verdict = comparison.verdict
    return [summary.group.label, str(len(summary.group.seeds)), *[show(summary.tasks.get(t)) for t in tasks],
            show(summary.val), show(summary.test), versus, p, verdict]


def conclusion(summaries: Sequence[Summary], reference: SeedGroup | None, rank_on: str) -> str:
    """One plain sentence: which configurations beat the reference, or that none does."""
    if reference is None:
        return "No reference configuration (balancer=uniform, surgery=none) among these jobs: give --reference JOB."
    better = [s.group.label for s in summaries if s.comparison is not None and s.comparison.verdict == "better"]
    if not better:
        return (f"No configuration is significantly better than the reference ({reference.label}) on {rank_on} Δm "
                f"(paired t-test over seeds, p < {1 - LEVEL:.2f}).")
    return f"Significantly better than the reference ({reference.label}) on {rank_on} Δm: {', '.join(better)}."
