"""What one job of a sweep needs from the runner: its share of the machine, and the value
it hands back to a Hydra sweeper.

Hydra's launchers (joblib, submitit) and sweepers (Optuna) do the scheduling; this module
only adapts a job to them. A joblib launcher runs ``n_jobs`` jobs side by side on one
machine: each job takes ``cores // n_jobs`` CPU threads (torch's default of all cores
per job would oversubscribe the machine ``n_jobs`` times) and, where GPUs exist, one GPU
by job number. An Optuna sweeper reads the task function's return value: the run's
``objective`` (a dotted path into ``results.json``: its ``val`` block, since a search
selects; a test-set path only under ``objective_on_test=true``), or ``None`` for a failed job, which
the sweeper records as a failed trial without stopping the study (a NaN would not do:
Optuna refuses it while telling, which aborts the sweep).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from omegaconf import DictConfig

from mtl_runner.errors import ConfigError


def objective_value(results: dict[str, Any], objective: str | None) -> float | None:
    """The value a sweeper optimises. Its path fitted :data:`mtl_runner.config.OBJECTIVE_PATTERNS`
    before the run; a path these results still lack is a one-line error naming what they
    do offer, since a silently missing objective would make every trial fail."""
    if objective is None:
        return None
    node: Any = results
    for part in objective.split("."):
        if not isinstance(node, dict) or part not in node:
            offered = _split_paths(results.get("val", {}), "val") + (["delta_m_pct"] if results.get("delta_m_pct") is not None else [])
            offered += sorted(_leaf_paths(results.get("tasks", {}), "tasks")) + sorted(f"test_losses.{t}" for t in results.get("test_losses", {}))
            raise ConfigError(f"objective={objective}: not in this run's results; available: {', '.join(offered)}")
        node = node[part]
    if node is None:
        raise ConfigError(f"objective={objective}: this run's results hold no value there (are single-task baselines computed?)")
    return float(node)


def _split_paths(block: dict[str, Any], prefix: str) -> list[str]:
    """The objective paths a ``val``/``test`` block of ``results.json`` offers."""
    paths = [f"{prefix}.delta_m_pct"] if block.get("delta_m_pct") is not None else []
    for field in ("metrics", "delta_pct"):
        paths += sorted(f"{prefix}.{field}.{task}.{metric}" for task, values in block.get(field, {}).items() for metric in values)
    return paths + sorted(f"{prefix}.losses.{task}" for task in block.get("losses", {}))


def _leaf_paths(tasks: dict[str, Any], prefix: str) -> list[str]:
    return [
        f"{prefix}.{task}.metrics.{metric}.{field}"
        for task, entry in tasks.items()
        for metric, values in entry.get("metrics", {}).items()
        for field in ("mtl", "delta_pct")
        if values.get(field) is not None
    ]


def apply_job_resources(cfg: DictConfig, launcher: DictConfig | None, job_num: int) -> DictConfig:
    """Give this job its share of the machine when a parallel local launcher runs it:
    ``trainer.num_threads`` (unless set) becomes ``cores // n_jobs``, and an ``auto``
    device becomes GPU ``job_num % gpus`` where GPUs exist. The runner applies them."""
    parallel = _parallel_jobs(launcher)
    if cfg.trainer.num_threads is None and parallel > 1:
        cfg.trainer.num_threads = max(1, (os.cpu_count() or 1) // parallel)
    if parallel > 1 and cfg.trainer.device == "auto" and torch.cuda.is_available():
        cfg.trainer.device = f"cuda:{job_num % torch.cuda.device_count()}"
    return cfg


def _parallel_jobs(launcher: DictConfig | None) -> int:
    """How many jobs a local launcher runs side by side (1 for sequential or remote ones:
    a SLURM job has its own cores and GPUs)."""
    if launcher is None or "JoblibLauncher" not in str(launcher.get("_target_", "")):
        return 1
    n_jobs = int(launcher.get("n_jobs") or 1)
    cores = os.cpu_count() or 1
    if n_jobs < 0:  # joblib's convention: -1 all cores, -2 all but one, ...
        n_jobs = cores + 1 + n_jobs
    return max(1, min(n_jobs, cores))
