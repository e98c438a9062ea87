"""``results.json`` / ``results.md`` and the end-of-run summary table.

``results.json`` follows docs/outputs.md: ``tasks.<task>.metrics.<metric>`` holds the MTL value
(``mtl``), its direction (``higher_is_better``) and the trivial predictor's value
(``trivial``); the single-task baseline fields (``stl``, ``delta_pct``, per task
``delta_pct_mean``), ``delta_m_pct``, ``parameters.stl_sum`` and the ``baselines`` section
are added by :func:`mtl_runner.baselines.add_to_results` when baselines ran. Those fields
are the test set's; the ``val`` and ``test`` blocks hold each split's metrics, losses,
deltas and Δm side by side (validation Δm against the baselines' validation metrics),
and ``selection`` the epoch reported (``trainer.select``). Anything that chooses between
runs or epochs reads ``val``; ``test`` is what is reported for the choice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from mtl_runner import io
from mtl_runner.tasks import Task


def task_results(
    tasks: tuple[Task, ...], mtl: dict[str, dict[str, float]], trivial: dict[str, dict[str, float]]
) -> dict[str, Any]:
    return {
        task.name: {
            "kind": task.kind,
            "auxiliary": task.auxiliary,
            "metrics": {
                m.name: {
                    "mtl": mtl[task.name][m.name],
                    "higher_is_better": m.higher_is_better,
                    "trivial": trivial[task.name][m.name],
                }
                for m in task.metrics
            },
        }
        for task in tasks
    }


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:+.2f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def _columns(results: dict[str, Any]) -> list[str]:
    has_stl = any("stl" in m for t in results["tasks"].values() for m in t["metrics"].values())
    return ["task", "metric", "dir", "mtl", "trivial"] + (["stl", "Δ% vs stl"] if has_stl else [])


def _rows(results: dict[str, Any]) -> list[list[str]]:
    rows = []
    for task, entry in results["tasks"].items():
        for metric, v in entry["metrics"].items():
            label = f"{task} (aux)" if entry.get("auxiliary") else task
            row = [label, metric, "↑" if v["higher_is_better"] else "↓", _fmt(v["mtl"]), _fmt(v["trivial"])]
            if "stl" in v:
                delta = v.get("delta_pct")
                row += [_fmt(v["stl"]), "-" if delta is None else f"{delta:+.2f}"]
            rows.append(row)
    return rows


def markdown(results: dict[str, Any]) -> str:
    cols = _columns(results)
    lines = [f"# {results['run_name']}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(r) + " |" for r in _rows(results)]
    lines.append("")
    if results.get("delta_m_pct") is not None:
        lines.append(f"**Δm = {results['delta_m_pct']:+.2f}%** (positive: better than single-task baselines)")
        lines.append("")
    lines += [f"{line}  " for line in split_lines(results) + comparison_lines(results)]
    return "\n".join(lines) + "\n"


def split_lines(results: dict[str, Any]) -> list[str]:
    """Which epoch is reported and, with baselines, Δm on validation beside test: the
    table above is the test set's, and a comparison between runs should be read on the
    validation line."""
    selection = results.get("selection")
    if selection is None:
        return []
    rule = "the best validation score" if selection["rule"] == "best_val" else "the last epoch"
    lines = [f"Reported model: epoch {selection['epoch']} ({rule}, trainer.select={selection['rule']})"]
    val, test = results["val"].get("delta_m_pct"), results["test"].get("delta_m_pct")
    if val is not None or test is not None:
        lines.append(f"Δm validation {_signed(val)} (for choosing), test {_signed(test)} (for reporting)")
    config = results.get("config", {})
    if config.get("objective_on_test") and config.get("objective"):
        lines.append(f"TUNED ON THE TEST SET: objective={config['objective']} with objective_on_test=true; "
                     "the test numbers of the chosen configuration are optimistic")
    return lines


def comparison_lines(results: dict[str, Any]) -> list[str]:
    """Per-task mean deltas and the costs of the MTL model beside those of the single-task
    models (parameters, encoder passes per input, wall time; a cached baseline's time is
    the time it took when it was trained)."""
    lines = []
    averages = [f"{task} {_signed(entry['delta_pct_mean'])}{' (auxiliary)' if entry.get('auxiliary') else ''}"
                for task, entry in results["tasks"].items() if "delta_pct_mean" in entry]
    if averages:
        lines.append("Mean Δ% per task: " + ", ".join(averages))
    params = results["parameters"]
    stl = results.get("baselines")
    if stl is None:
        lines.append(f"Parameters: {params['mtl']:,} (MTL model)")
        lines.append(f"Wall time: {results['wall_time_s']:.1f} s")
        return lines
    lines.append(f"Parameters: {params['mtl']:,} (MTL model) vs {params['stl_sum']:,} (sum of {len(stl['tasks'])} single-task models)")
    lines.append(f"Forward passes per input: {results['forward_passes_per_input']} (MTL) vs {stl['forward_passes_per_input']} (single-task)")
    lines.append(f"Wall time: {results['wall_time_s']:.1f} s (MTL run) vs {stl['wall_time_s']:.1f} s (single-task baselines; "
                 f"{stl['trained_this_run_s']:.1f} s trained in this run, the rest cached)")
    return lines


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2f}%"


def print_summary(results: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title=f"test metrics: {results['run_name']}")
    for col in _columns(results):
        table.add_column(col, justify="left" if col in ("task", "metric") else "right")
    for row in _rows(results):
        table.add_row(*row)
    console.print(table)
    if results.get("delta_m_pct") is not None:
        console.print(f"Δm = {results['delta_m_pct']:+.2f}% (positive: better than single-task baselines)")
    for line in split_lines(results) + comparison_lines(results):
        console.print(line)


def final_metrics(results: dict[str, Any]) -> dict[str, float]:
    """Flat ``test/<task>/<metric>`` values of the main tasks (and Δm when present) for
    TensorBoard's HPARAMS tab, and their ``val/`` twins, the columns to sort a sweep by;
    auxiliary tasks are not what a run is judged by. Δm (test, then validation) comes
    first: the table shows metrics in this order after the hparams, and at a common
    window width only the first two or three metric columns are in view."""
    flat: dict[str, float] = {}
    val = results.get("val")
    if results.get("delta_m_pct") is not None:
        flat["hparam/delta_m_pct"] = float(results["delta_m_pct"])
    if val is not None and val.get("delta_m_pct") is not None:
        flat["hparam/val/delta_m_pct"] = float(val["delta_m_pct"])
    flat.update({
        f"hparam/test/{task}/{metric}": float(v["mtl"])
        for task, entry in results["tasks"].items()
        if not entry.get("auxiliary", False)
        for metric, v in entry["metrics"].items()
    })
    if val is not None:
        main = [task for task, entry in results["tasks"].items() if not entry.get("auxiliary", False)]
        flat.update({f"hparam/val/{task}/{metric}": float(value) for task in main for metric, value in val["metrics"][task].items()})
    return flat


def write(run_dir: Path, results: dict[str, Any]) -> None:
    io.write_json(run_dir / "results.json", results)
    io.write_text(run_dir / "results.md", markdown(results))
