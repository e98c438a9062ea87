"""What ``mtl-affinity`` writes, for any set of affinity matrices: ``affinity.json``,
a heatmap and a dendrogram PNG per measure (also as TensorBoard images), and the
recommended grouping per measure.

Every measure is a ``(T, T)`` matrix with rows the source task and columns the target
task, so a new measure (a module beside ``gradient.py``) only adds an entry to the dict
handed to :func:`write_outputs`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from scipy.cluster.hierarchy import dendrogram  # noqa: E402
from torch import Tensor  # noqa: E402

from mtl_runner import io  # noqa: E402
from mtl_runner.affinity.grouping import average_linkage, best_grouping, task_scores  # noqa: E402
from mtl_runner.train.logger import RunLogger  # noqa: E402

#: What each measure means, for the JSON, the plots and the README.
DESCRIPTIONS = {
    "gradient": "mean cosine of the task gradients on the shared parameters (symmetric)",
    "lookahead": "TAG lookahead affinity Z[i][j] = 1 - L_j(after a step on task i) / L_j(before), mean over steps",
    "cka": "linear CKA between the single-task baselines' representations of the same held-out inputs (symmetric)",
    "transfer": "transfer gain % of target j fine-tuned from source i's single-task baseline vs j from scratch (same budget)",
}


@dataclass
class AffinityMatrix:
    """One measure's ``(T, T)`` matrix over ``tasks`` (rows: source, columns: target)."""

    tasks: list[str]
    values: Tensor


def heatmap(matrix: Tensor, names: list[str], title: str) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(names), 1.0 + 0.8 * len(names)))
    values = matrix.double().numpy()
    bound = max(abs(values).max(), 1e-12)
    image = ax.imshow(values, cmap="RdBu_r", vmin=-bound, vmax=bound)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("target task (affected)")
    ax.set_ylabel("source task")
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{values[i, j]:.2g}", ha="center", va="center", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.8)
    fig.tight_layout()
    return fig


def dendrogram_figure(matrix: Tensor, names: list[str], title: str) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(2.0 + 0.7 * len(names), 3.0))
    with warnings.catch_warnings():  # all merges at distance 0 (e.g. two tasks): a flat axis is right
        warnings.simplefilter("ignore", UserWarning)
        dendrogram(average_linkage(matrix), labels=names, ax=ax, leaf_rotation=45)
    ax.set_ylabel("distance (max affinity - affinity)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def write_outputs(
    out_dir: Path,
    matrices: dict[str, AffinityMatrix],
    k: int,
    logger: RunLogger,
    extra: dict[str, Any] | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Write everything for ``matrices`` (by measure) and return the JSON dict."""
    console = console or Console()
    out: dict[str, Any] = {"k": k, "orientation": "rows: source task i, columns: target task j", "measures": {}}
    for measure, entry in matrices.items():
        names, matrix = entry.tasks, entry.values
        grouping = best_grouping(matrix, k)
        groups = [[names[i] for i in g] for g in grouping.groups]
        out["measures"][measure] = {
            "description": DESCRIPTIONS.get(measure, measure),
            "tasks": names,
            "matrix": matrix.double().tolist(),
            "grouping": {
                "groups": groups,
                "score": grouping.score,
                "method": grouping.method,
                "task_scores": dict(zip(names, task_scores(matrix, grouping.groups))),
            },
        }
        figures = {"heatmap": heatmap(matrix, names, f"{measure} affinity (row: source, column: target)")}
        if len(names) > 1:
            figures["dendrogram"] = dendrogram_figure(matrix, names, f"{measure}: average linkage")
        for kind, fig in figures.items():
            fig.savefig(out_dir / f"{kind}_{measure}.png", dpi=120)
            logger.figure(f"affinity/{kind}/{measure}", fig)
            plt.close(fig)
        logger.text(f"affinity/grouping/{measure}", f"k={k}: " + " | ".join("{" + ", ".join(g) + "}" for g in groups))
        _print(console, measure, matrix, names, groups, grouping.score)
    out.update(extra or {})
    io.write_json(out_dir / "affinity.json", out)
    return out


def _print(console: Console, measure: str, matrix: Tensor, names: list[str], groups: list[list[str]], score: float) -> None:
    table = Table(title=f"{measure} affinity (row -> column)")
    table.add_column("source")
    for name in names:
        table.add_column(name, justify="right")
    for i, name in enumerate(names):
        table.add_row(name, *(f"{float(v):+.4f}" for v in matrix[i]))
    console.print(table)
    console.print(f"recommended grouping ({measure}): " + " | ".join("{" + ", ".join(g) + "}" for g in groups) + f"  (score {score:+.4f})")
