"""Transfer affinity (Taskonomy-style, Zamir et al. CVPR 2018): how much does training on
task A help task B?

For every ordered pair ``(A, B)``, ``A != B``: start from A's single-task baseline (its
encoder; B's head is fresh because A's checkpoint has none), fine-tune on B with exactly
B's baseline budget (same epochs, optimizer, schedule, batch size and seed), and compare
B's test metrics with B's baseline trained from scratch. Both trainings are single-task
baselines of B (:func:`mtl_runner.baselines.ensure_baseline`), the fine-tuned one with
``init_from`` set to A's entry, so they run the same code, are cached the same way, and
differ in the initialisation alone.

The entry ``[A][B]`` is B's mean relative gain in percent over its metrics, signed so
that "better" is positive (each metric's ``delta_pct``, the Δm convention):

    gain(A -> B) = mean_m  s_m * (M_m(A -> B) - M_m(B from scratch)) / |M_m(B from scratch)| * 100

Positive: A's representation is a better starting point for B than a random
initialisation. The diagonal stays 0 (a task's transfer to itself is not measured). Rows
are sources and columns targets, the orientation of every ``mtl-affinity`` matrix, so it
feeds the same grouping search.

The fine-tuning uses the run's ``finetune`` settings (``finetune.freeze_stages=k`` measures
transfer with A's first ``k`` stages fixed, ``finetune.lr_decay`` applies); the
from-scratch baselines never do (freezing random stages is not a baseline).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from mtl_runner import baselines, io
from mtl_runner.data.base import TaskSet
from mtl_runner.tasks import Task

CONF_DIR = Path(__file__).resolve().parent.parent.parent / "conf"


def transfer_gain_pct(task: Task, tuned: Mapping[str, float], scratch: Mapping[str, float]) -> float:
    """Mean ``delta_pct`` of ``task``'s metrics, fine-tuned vs from scratch (NaN when no
    metric has a usable from-scratch value)."""
    deltas = [baselines.delta_pct(tuned[m.name], scratch[m.name], m.higher_is_better) for m in task.metrics]
    defined = [d for d in deltas if d is not None]
    return sum(defined) / len(defined) if defined else math.nan


def scratch_config(cfg: DictConfig) -> DictConfig:
    """``cfg`` without any fine-tuning: the recipe of the from-scratch baselines."""
    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    out.finetune = OmegaConf.load(CONF_DIR / "finetune" / "default.yaml")
    out.init_from = None
    return out


def transfer_config(cfg: DictConfig, source: baselines.BaselineRecord) -> DictConfig:
    """``cfg`` fine-tuning from ``source``'s trained single-task model."""
    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    out.init_from = str(source.directory)
    out.finetune.reinit_heads = False  # the target's head is absent from the source: always fresh
    return out


def transfer_affinity(
    cfg: DictConfig, taskset: TaskSet, out_dir: Path | None = None, console: Console | None = None
) -> tuple[list[str], torch.Tensor]:
    """The transfer matrix over the non-auxiliary tasks of ``taskset`` (percent gains,
    rows: source, columns: target). With ``out_dir``, ``transfer.json`` there records every
    from-scratch and fine-tuned metric and the cache entries they came from."""
    console = console or Console()
    tasks: Sequence[Task] = [t for t in taskset.tasks if not t.auxiliary]
    scratch_cfg = scratch_config(cfg)
    scratch = {t.name: baselines.ensure_baseline(scratch_cfg, t.name, taskset=taskset, console=console) for t in tasks}
    gains = torch.zeros(len(tasks), len(tasks), dtype=torch.float64)
    pairs: list[dict[str, Any]] = []
    for j, target in enumerate(tasks):
        for i, source in enumerate(tasks):
            if i == j:
                continue
            tuned = baselines.ensure_baseline(transfer_config(cfg, scratch[source.name]), target.name, taskset=taskset, console=console)
            gains[i, j] = transfer_gain_pct(target, tuned.metrics, scratch[target.name].metrics)
            console.print(f"transfer {source.name} -> {target.name}: {gains[i, j].item():+.2f}%")
            pairs.append({"source": source.name, "target": target.name, "gain_pct": gains[i, j].item(),
                          "finetuned_metrics": tuned.metrics, "entry": str(tuned.directory)})
    names = [t.name for t in tasks]
    if out_dir is not None:
        io.write_json(Path(out_dir) / "transfer.json", {
            "tasks": names,
            "gain_pct": gains.tolist(),
            "scratch": {name: {"metrics": r.metrics, "entry": str(r.directory)} for name, r in scratch.items()},
            "pairs": pairs,
        })
    return names, gains
