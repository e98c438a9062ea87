"""``mtl-report``: one table over runs and sweeps, sorted by Δm.

A job is a directory that ``mtl-run`` made: it holds ``.hydra/`` (its overrides) and,
once it ended, ``results.json``. The report walks every PATH given for such
directories, so a single run, a sweep, or a folder of sweeps all work. A job without
``results.json`` is ``unfinished``; one whose ``results.json`` says ``failed`` or
``interrupted`` keeps that status and its error; neither breaks the report.

Columns: the job, its status, the overrides that differ between the jobs shown (a
constant override says nothing about the ranking), each task's mean delta against its
single-task baseline (``delta_pct_mean``, in %, test set), Δm on validation and on test.
Rows are ranked by validation Δm: a ranking selects, and selecting on test would make the
test numbers optimistic. Jobs that differ only by ``trainer.seed`` are also grouped into
one row per configuration with means, intervals and a verdict against a reference
(:mod:`mtl_runner.seeds`).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table

from mtl_runner import io as files
from mtl_runner import seeds
from mtl_runner.config import PRESENTATION_KEYS
from mtl_runner.errors import ReportError

DELTA_M = "Δm test %"
DELTA_M_VAL = "Δm val %"


@dataclass
class JobRow:
    """One job of the report; ``task_deltas`` maps task -> mean Δ% (None: no baseline)."""

    name: str
    path: Path
    status: str
    overrides: dict[str, str] = field(default_factory=dict)
    task_deltas: dict[str, float | None] = field(default_factory=dict)
    delta_m: float | None = None
    error: str | None = None
    val_delta_m: float | None = None
    seed: str | None = None
    #: The option chosen in each config group (Hydra's runtime choices), e.g. balancer -> uniform.
    choices: dict[str, str] = field(default_factory=dict)


def _is_job(path: Path) -> bool:
    return (path / ".hydra").is_dir() or (path / "results.json").is_file()


def find_jobs(paths: Sequence[Path]) -> list[Path]:
    """Every job directory under ``paths`` (a job's own subfolders are not searched)."""
    jobs: list[Path] = []
    for path in paths:
        if not path.is_dir():
            raise ReportError(f"{path}: no such directory")
        found = []
        for root, dirs, _ in os.walk(path):
            here = Path(root)
            if _is_job(here):
                found.append(here)
                dirs.clear()
            else:
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if not found:
            raise ReportError(f"{path}: no mtl-run job found (a job directory holds .hydra/ or results.json)")
        jobs += sorted(found)
    return list(dict.fromkeys(jobs))


def _overrides(job: Path) -> dict[str, str]:
    file = job / ".hydra" / "overrides.yaml"
    if not file.is_file():
        return {}
    try:
        items = OmegaConf.to_container(OmegaConf.load(file)) or []
    except Exception:  # a damaged overrides.yaml: the job is listed without its overrides
        return {}
    out = {}
    for item in items if isinstance(items, list) else []:
        key, _, value = str(item).partition("=")
        key = key.lstrip("+~")
        if key not in PRESENTATION_KEYS and not key.startswith("hydra"):
            out[key] = value
    return out


def _choices(job: Path) -> dict[str, str]:
    file = job / ".hydra" / "hydra.yaml"
    try:
        choices = OmegaConf.select(OmegaConf.load(file), "hydra.runtime.choices", default=None) if file.is_file() else None
    except Exception:  # a damaged hydra.yaml: the job is grouped by its overrides alone
        return {}
    return {str(k): str(v) for k, v in (choices or {}).items()}


def _split_fields(row: JobRow, results: dict[str, Any]) -> None:
    """Validation Δm and the seed of a job's results (either may be absent: older runs)."""
    val, config = results.get("val"), results.get("config")
    if isinstance(val, dict) and isinstance(val.get("delta_m_pct"), (int, float)):
        row.val_delta_m = float(val["delta_m_pct"])
    trainer = config.get("trainer") if isinstance(config, dict) else None
    if isinstance(trainer, dict) and trainer.get("seed") is not None:
        row.seed = str(trainer["seed"])


def load_job(job: Path, name: str) -> JobRow:
    row = JobRow(name=name, path=job, status="unfinished", overrides=_overrides(job), choices=_choices(job))
    row.seed = row.overrides.get(seeds.SEED_KEY)
    file = job / "results.json"
    if not file.is_file():
        return row
    try:
        results = json.loads(file.read_text())
        # any content may be there (a hand edit, another tool's file): read, never trust
        status, error, delta_m = results.get("status", "unknown"), results.get("error"), results.get("delta_m_pct")
        task_deltas = {str(task): _number(entry.get("delta_pct_mean")) for task, entry in results.get("tasks", {}).items()}
    except (OSError, ValueError, AttributeError, TypeError) as exc:
        row.status, row.error = "unreadable", f"results.json: {type(exc).__name__}"
        return row
    row.status, row.error = str(status), None if error is None else str(error)
    row.delta_m, row.task_deltas = _number(delta_m), task_deltas
    _split_fields(row, results)
    return row


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _job_names(jobs: list[Path]) -> list[str]:
    """Names relative to the jobs' common parent, so jobs of different sweeps stay apart."""
    if len(jobs) == 1:
        return [jobs[0].name]
    base = Path(os.path.commonpath([str(j.resolve()) for j in jobs]))
    return [str(j.resolve().relative_to(base)) for j in jobs]


def collect(paths: Sequence[Path]) -> list[JobRow]:
    jobs = find_jobs(paths)
    return [load_job(job, name) for job, name in zip(jobs, _job_names(jobs))]


# ---------------------------------------------------------------- the table
@dataclass
class ReportTable:
    headers: list[str]
    rows: list[JobRow]
    override_keys: list[str]
    tasks: list[str]
    sorted_by: str = DELTA_M_VAL

    def values(self, row: JobRow) -> list[Any]:
        """The row's cells as data (None where empty), in ``headers`` order."""
        return ([row.name, row.status] + [row.overrides.get(k) for k in self.override_keys]
                + [row.task_deltas.get(t) for t in self.tasks] + [row.val_delta_m, row.delta_m])


def _varying(rows: list[JobRow]) -> list[str]:
    keys = list(dict.fromkeys(k for r in rows for k in r.overrides))
    if len(rows) == 1:
        return keys
    return [k for k in keys if len({r.overrides.get(k) for r in rows}) > 1]


def _is_number(value: str | None) -> bool:
    try:
        float(str(value))
    except ValueError:
        return False
    return True


def _task_header(task: str) -> str:
    return f"Δ{task} %"


def build_table(rows: list[JobRow], sort: str = "delta_m_val") -> ReportTable:
    """Columns and sorted rows. ``sort``: ``delta_m_val`` (the default), ``delta_m`` (test),
    ``job``, ``status``, an override key or a task name; deltas sort best first, override
    values in ascending (numeric where they all are numbers) order, jobs without a value last."""
    keys = _varying(rows)
    tasks = list(dict.fromkeys(t for r in rows for t in r.task_deltas))
    table = ReportTable(["job", "status", *keys, *map(_task_header, tasks), DELTA_M_VAL, DELTA_M], rows, keys, tasks)
    columns = {"delta_m_val": DELTA_M_VAL, "delta_m": DELTA_M, "job": "job", "status": "status",
               **{k: k for k in keys}, **{t: _task_header(t) for t in tasks}}
    if sort not in columns:
        raise ReportError(f"--sort {sort}: no such column; allowed: {', '.join(columns)}")
    index = table.headers.index(columns[sort])
    best_first = columns[sort] in (DELTA_M, DELTA_M_VAL) or sort in tasks
    numbers = sort in keys and all(_is_number(r.overrides.get(sort)) for r in rows if r.overrides.get(sort) is not None)

    def order(row: JobRow) -> tuple[int, Any]:
        value = table.values(row)[index]
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return (1, 0)
        if best_first:
            return (0, -value)
        return (0, float(value)) if numbers else (0, str(value))

    table.rows = sorted(rows, key=order)
    table.sorted_by = columns[sort]
    return table


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:+.2f}"
    return str(value)


def to_markdown(table: ReportTable) -> str:
    lines = ["| " + " | ".join(table.headers) + " |", "|" + "---|" * len(table.headers)]
    lines += ["| " + " | ".join(_cell(v) for v in table.values(r)) + " |" for r in table.rows]
    return "\n".join(lines) + "\n"


def to_csv(table: ReportTable) -> str:
    """The table with raw numbers (empty where none), plus each job's error and path."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([*table.headers, "error", "path"])
    for row in table.rows:
        writer.writerow(["" if v is None else v for v in table.values(row)] + [row.error or "", str(row.path)])
    return buffer.getvalue()


def print_table(table: ReportTable, console: Console) -> None:
    out = Table(title=f"mtl-report: {len(table.rows)} job(s), sorted by {table.sorted_by}")
    for header in table.headers:
        out.add_column(header, justify="left" if header in ("job", "status") or header in table.override_keys else "right")
    for row in table.rows:
        cells = [_cell(v) for v in table.values(row)]
        style = None if row.status == "completed" else "red"
        out.add_row(*cells, style=style)
    console.print(out)
    for row in table.rows:
        if row.status != "completed":
            console.print(f"{row.name}: {row.status}" + (f" ({row.error})" if row.error else ""))


def plot(table: ReportTable, path: Path) -> None:
    """A bar chart of Δm per job (green better than the baselines, red worse) above a
    heatmap of each task's mean delta, colours centred on 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = table.rows
    names = [r.name if r.status == "completed" else f"{r.name} [{r.status}]" for r in rows]
    dm = np.array([np.nan if r.delta_m is None else r.delta_m for r in rows], dtype=float)
    grid = np.array([[np.nan if r.task_deltas.get(t) is None else r.task_deltas[t] for t in table.tasks] for r in rows], dtype=float).reshape(len(rows), len(table.tasks))
    height = 1.5 + 0.35 * len(rows)
    fig, (bars, heat) = plt.subplots(1, 2, figsize=(6 + 1.2 * max(len(table.tasks), 1), height),
                                     gridspec_kw={"width_ratios": [2, max(len(table.tasks), 1)]}, sharey=True)
    y = np.arange(len(rows))
    bars.barh(y, np.nan_to_num(dm), color=["tab:green" if v > 0 else "tab:red" if v < 0 else "tab:gray" for v in np.nan_to_num(dm)])
    bars.axvline(0, color="black", linewidth=0.8)
    bars.set_yticks(y, names, fontsize=8)
    bars.invert_yaxis()
    bars.set_xlabel("Δm % (vs single-task baselines)")
    finite = grid[np.isfinite(grid)]
    limit = float(np.abs(finite).max()) if finite.size else 1.0
    image = heat.imshow(np.ma.masked_invalid(grid), cmap="RdYlGn", vmin=-limit, vmax=limit, aspect="auto")
    heat.set_xticks(np.arange(len(table.tasks)), table.tasks, rotation=30, ha="right")
    for (i, j), value in np.ndenumerate(grid):
        if np.isfinite(value):
            heat.text(j, i, f"{value:+.1f}", ha="center", va="center", fontsize=7)
    heat.set_title("mean Δ% per task", fontsize=9)
    fig.colorbar(image, ax=heat, fraction=0.05)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def seed_report(table: ReportTable, reference_job: str | None, rank_on: str = "val") -> str | None:
    """The seed groups as Markdown with the verdict sentence; None when no configuration
    has more than one seed (and no ``--reference`` asks for the comparison)."""
    groups = seeds.group_rows(table.rows)
    if reference_job is None and all(len(g.seeds) < 2 for g in groups):
        return None
    if reference_job is None:
        reference = seeds.default_reference(groups)
    else:
        reference = next((g for g in groups if reference_job in g.jobs), None)
        if reference is None:
            raise ReportError(f"--reference {reference_job}: no completed job of that name; jobs: {', '.join(j for g in groups for j in g.jobs)}")
    summaries = seeds.summarise(groups, reference, rank_on)
    tasks = list(dict.fromkeys(t for g in groups for t in g.task_deltas))
    heads = seeds.headers(tasks, reference, rank_on)
    lines = [f"Seed groups, ranked by mean {rank_on} Δm (mean ± half-width of the 95% t-interval over seeds):", "",
             "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    lines += ["| " + " | ".join(seeds.cells(s, tasks, reference)) + " |" for s in summaries]
    return "\n".join([*lines, "", seeds.conclusion(summaries, reference, rank_on)]) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mtl-report", description="Compare mtl-run runs and sweeps: one row per job, sorted by "
                                     "validation Δm; jobs differing only by trainer.seed grouped with 95% intervals and a paired t-test")
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="run, sweep or outputs directories")
    parser.add_argument("--csv", type=Path, metavar="FILE", help="also write the table as CSV (with errors and job paths)")
    parser.add_argument("--markdown", type=Path, metavar="FILE", help="also write the table as Markdown")
    parser.add_argument("--plot", type=Path, metavar="FILE.png", help="bar chart of Δm per job and heatmap of per-task deltas")
    parser.add_argument("--sort", default="delta_m_val", metavar="COLUMN",
                        help="delta_m_val (default: validation Δm), delta_m (test), job, status, an override key or a task name")
    parser.add_argument("--reference", metavar="JOB", help="the seed group to test against: one of its jobs (default: balancer=uniform, surgery=none)")
    parser.add_argument("--rank-on", choices=("val", "test"), default="val",
                        help="the Δm that ranks seed groups and is tested against the reference (default: val)")
    args = parser.parse_args(argv)
    try:
        for out in (args.csv, args.markdown, args.plot):
            if out is not None and not out.resolve().parent.is_dir():
                raise ReportError(f"{out}: its directory does not exist")
        if args.plot is not None and args.plot.suffix.lower() != ".png":
            raise ReportError(f"--plot {args.plot}: give a .png file")
        table = build_table(collect(args.paths), args.sort)
        grouped = seed_report(table, args.reference, args.rank_on)
    except ReportError as exc:
        print(f"mtl-report: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    # Piped output (a file, CI logs) gets the full table rather than one cut to 80 columns.
    console = Console() if sys.stdout.isatty() else Console(width=1000)
    print_table(table, console)
    if grouped is not None:
        console.print(grouped, markup=False)
    if args.csv is not None:
        files.write_text(args.csv, to_csv(table))
    if args.markdown is not None:
        files.write_text(args.markdown, to_markdown(table) + ("" if grouped is None else "\n" + grouped))
    if args.plot is not None:
        plot(table, args.plot)
