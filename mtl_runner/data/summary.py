"""The data summary a run prints at its start and keeps as ``data_summary.json``.

Per split its size; per task its kind, label coverage (labelled entries over all entries:
a missing label is ``IGNORE_INDEX`` or NaN), and its class balance (class and binary
labels), positive rate per label (multilabel) or target range (regression and dense
regression). Splits that hold their targets in memory (``TensorSplit``, or a ``Dataset``
with a ``targets`` dict, as ``image_table``'s) are summarised from them without reading
inputs; for other splits only the size is known. ``TaskSet.preprocessing`` (a table's
input statistics) goes into the file too, so an evaluation can reproduce the inputs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor

from mtl_runner import io
from mtl_runner.data.base import Split, TaskSet
from mtl_runner.errors import ConfigError
from mtl_runner.tasks import IGNORE_INDEX, Task

FILE_NAME = "data_summary.json"
#: Classes listed per task in the printed table (the JSON file lists all).
SHOWN_CLASSES = 6


def split_targets(split: Split) -> dict[str, Tensor] | None:
    """The split's targets if they are held in memory, else ``None``."""
    targets = getattr(split, "targets", None)
    if targets is None:
        targets = getattr(getattr(split, "dataset", None), "targets", None)
    return targets if isinstance(targets, dict) else None


def _task_statistics(task: Task, target: Tensor) -> dict[str, Any]:
    target = target.detach().cpu()
    if not target.is_floating_point():  # class labels
        labelled = target[target != IGNORE_INDEX]
        counts = torch.bincount(labelled.reshape(-1), minlength=task.num_outputs).tolist()
        names = task.class_names or tuple(str(i) for i in range(len(counts)))
        # a token-level target's IGNORE_INDEX marks padding, [CLS] and later sub-words, not missing labels
        coverage = 1.0 if task.is_token_level else labelled.numel() / max(target.numel(), 1)
        return {"coverage": coverage, "classes": dict(zip(names, counts))}
    valid = ~target.isnan()
    if task.kind == "depth":
        valid &= target > 0
    values = target[valid].double()
    stats: dict[str, Any] = {"coverage": values.numel() / max(target.numel(), 1)}
    if task.kind == "binary":
        names = task.class_names or ("0", "1")
        stats["classes"] = {names[0]: int((values == 0).sum()), names[1]: int((values == 1).sum())}
    elif task.kind == "multilabel":
        rate = torch.where(valid, target.nan_to_num(), 0.0).sum(0) / valid.sum(0).clamp_min(1)
        names = task.class_names or tuple(str(i) for i in range(len(rate)))
        stats["positive_rate"] = dict(zip(names, rate.tolist()))
    elif values.numel():
        stats["range"] = {"min": float(values.min()), "max": float(values.max()), "mean": float(values.mean())}
    return stats


def summarise(taskset: TaskSet) -> dict[str, Any]:
    splits = {"train": taskset.train, "val": taskset.val, "test": taskset.test}
    summary: dict[str, Any] = {
        "dataset": taskset.name,
        "input_shape": list(taskset.input_shape),
        "splits": {name: len(split) for name, split in splits.items()},
        "tasks": {},
    }
    for task in taskset.tasks:
        entry: dict[str, Any] = {"kind": task.kind, "outputs": task.num_outputs}
        for name, split in splits.items():
            targets = split_targets(split)
            if targets is not None and task.name in targets:
                entry[name] = _task_statistics(task, targets[task.name])
        summary["tasks"][task.name] = entry
    if taskset.preprocessing:
        summary["preprocessing"] = taskset.preprocessing
    return summary


def _describe(stats: dict[str, Any]) -> str:
    if "classes" in stats:
        items = list(stats["classes"].items())
        total = max(sum(count for _, count in items), 1)
        shown = ", ".join(f"{name}: {count / total:.0%}" for name, count in items[:SHOWN_CLASSES])
        return shown + (f", ... ({len(items)} classes)" if len(items) > SHOWN_CLASSES else "")
    if "positive_rate" in stats:
        rates = list(stats["positive_rate"].items())
        return "positive " + ", ".join(f"{name}: {rate:.0%}" for name, rate in rates[:SHOWN_CLASSES])
    if "range" in stats:
        r = stats["range"]
        return f"{r['min']:.4g} .. {r['max']:.4g} (mean {r['mean']:.4g})"
    return ""


def report(taskset: TaskSet, console: Console, run_dir: Path | None) -> dict[str, Any]:
    """Print the summary and, with ``run_dir``, write it there."""
    summary = summarise(taskset)
    sizes = ", ".join(f"{name} {size}" for name, size in summary["splits"].items())
    table = Table(title=f"data: {taskset.name} ({sizes})", title_justify="left")
    for column in ("task", "kind", "labelled (train)", "train labels"):
        table.add_column(column)
    for name, entry in summary["tasks"].items():
        train = entry.get("train", {})
        coverage = f"{train['coverage']:.1%}" if "coverage" in train else "-"
        table.add_row(name, entry["kind"], coverage, _describe(train) or "-")
    console.print(table)
    if run_dir is not None:
        io.write_json(Path(run_dir) / FILE_NAME, summary)
    return summary


def saved_preprocessing(path: str | Path) -> dict[str, Any]:
    """What an earlier run fitted on its training split (``preprocessing`` of the
    ``data_summary.json`` at ``path``, a run directory or the file itself), so that a resumed
    run or an evaluation encodes inputs as that run did, not as the data would now give."""
    file = Path(path) / FILE_NAME if Path(path).is_dir() else Path(path)
    try:
        preprocessing = json.loads(file.read_text())["preprocessing"]
        preprocessing["inputs"]["numeric"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(f"dataset.statistics={path}: no {FILE_NAME} with fitted input statistics there; give a run directory of dataset=table") from None
    return preprocessing
