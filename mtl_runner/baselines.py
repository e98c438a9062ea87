"""Single-task baselines (cached), per-task deltas and Δm (Maninis et al., 2019).

The baseline of task ``t`` is the run's dataset, backbone, head, optimizer, schedule,
epochs, seed and fine-tuning protocol with ``t`` alone: ``sharing=hard`` over one task,
``balancer=uniform``, ``surgery=none``, trained by the same :class:`Trainer`. Auxiliary
tasks get none: they exist to help the main tasks, so they are left out of Δm and of the
single-task alternative.

Cache: ``<baseline.root>/<task>-<digest>/``, the digest hashing exactly the settings that
determine the baseline (:func:`key_material`), so every job of a sweep over balancers,
surgeries or sharing strategies reuses one entry per task. A per-entry file lock makes
concurrent jobs wait instead of training twice. ``baseline.json`` is written last,
atomically, and records the checkpoint's SHA-256: an entry without it, with a truncated
one, or whose checkpoint no longer matches is rebuilt, never read as valid.

An entry is also an ``mtl-run`` run directory (``checkpoints/last.pt``, TensorBoard events), so
``init_from=<entry>`` starts a model from a trained baseline.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from mtl_runner import build, checkpoints, io
from mtl_runner.assemble import build_run
from mtl_runner.data.base import TaskSet
from mtl_runner.models.sharing.base import SharingModel
from mtl_runner.tasks import Task
from mtl_runner.train.selection import BEST_NAME, Score
from mtl_runner.train.state import EvalResult

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
#: Bumped when the meaning of a cached entry changes, so old entries are not reused
#: (2: entries record validation metrics, which validation Δm and model selection need).
CACHE_FORMAT = 2
RECORD_FILE = "baseline.json"
#: The options a baseline always uses, whatever the run chose.
BASELINE_OPTIONS = {"sharing": "hard", "balancer": "uniform", "surgery": "none"}
#: Trainer settings that do not change what a baseline learns (speed, logging, device).
#: Every other trainer setting is part of the key, so a setting added later is safe by default.
TRAINER_KEYS_IGNORED = frozenset({
    "device", "progress", "log_every_n_steps", "checkpoint_every_n_steps", "num_workers", "eval_batch_size",
    "jacobian", "compile", "channels_last", "deterministic", "num_threads",
})


@dataclass(frozen=True)
class BaselineRecord:
    """A trained single-task baseline as stored in its cache entry.

    ``wall_time_s`` is the time the entry took to train and test when it was built;
    ``trained_now`` says whether this process built it (else it came from the cache)."""

    task: str
    key: str
    directory: Path
    metrics: dict[str, float]
    num_parameters: int
    wall_time_s: float
    val_metrics: dict[str, float]
    trained_now: bool = False

    @property
    def checkpoint_path(self) -> Path:
        return checkpoints.last_checkpoint(self.directory)

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "dir": str(self.directory), "metrics": self.metrics, "val_metrics": self.val_metrics,
                "num_parameters": self.num_parameters, "wall_time_s": self.wall_time_s, "cached": not self.trained_now}


# ---------------------------------------------------------------- the key
def baseline_config(cfg: DictConfig) -> DictConfig:
    """The run's config with the baseline's fixed options (their own YAML files) put in
    place of the run's sharing, balancer and surgery, and any auxiliary task removed."""
    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    for group, option in BASELINE_OPTIONS.items():
        out[group] = OmegaConf.load(CONF_DIR / group / f"{option}.yaml")
    if "aux" in out:
        out.aux = None
    if "diagnostics" in out:
        out.diagnostics.every_n_steps = 0
    return out


def key_material(cfg: DictConfig, task_name: str) -> dict[str, Any]:
    """Everything that determines the baseline of ``task_name``, and nothing else: the
    balancer, surgery, sharing, diagnostics, logging and checkpoint settings are absent."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(plain, dict)
    trainer = {k: v for k, v in plain["trainer"].items() if k not in TRAINER_KEYS_IGNORED}
    return {
        "format": CACHE_FORMAT,
        "task": task_name,
        "dataset": plain["dataset"],
        "backbone": plain["backbone"],
        "optimizer": plain["optimizer"],
        "trainer": trainer,
        "finetune": plain.get("finetune"),
        "init_from": plain.get("init_from"),
    }


def cache_key(cfg: DictConfig, task_name: str) -> str:
    canonical = json.dumps(key_material(cfg, task_name), sort_keys=True, separators=(",", ":"))
    return f"{task_name}-{hashlib.sha256(canonical.encode()).hexdigest()[:16]}"


def baseline_root(cfg: DictConfig) -> Path:
    return Path(str(cfg.baseline.root)).expanduser()


# --------------------------------------------------------------- the cache
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_record(directory: Path) -> BaselineRecord | None:
    """The entry's record, or ``None`` when the entry is missing, partial or corrupt."""
    directory = Path(directory)
    try:
        stored = json.loads((directory / RECORD_FILE).read_text())
        checkpoint = checkpoints.last_checkpoint(directory)
        if stored["format"] != CACHE_FORMAT or _sha256(checkpoint) != stored["checkpoint_sha256"]:
            return None
        return BaselineRecord(
            task=str(stored["task"]), key=directory.name, directory=directory,
            metrics={k: float(v) for k, v in stored["metrics"].items()},
            num_parameters=int(stored["num_parameters"]), wall_time_s=float(stored["wall_time_s"]),
            val_metrics={k: float(v) for k, v in stored["val_metrics"].items()},
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def ensure_baseline(
    cfg: DictConfig, task_name: str, *, taskset: TaskSet | None = None, console: Console | None = None
) -> BaselineRecord:
    """The baseline of ``task_name`` under ``cfg``: read from the cache, or trained into it
    (under a lock, so concurrent callers train it once). ``taskset`` spares rebuilding the
    dataset when the caller has it (it must come from the same ``cfg.dataset``)."""
    console = console or Console()
    key = cache_key(cfg, task_name)
    root = baseline_root(cfg)
    directory = root / key
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{key}.lock")):
        record = read_record(directory)
        if record is not None:
            console.print(f"baseline {task_name}: cached in {directory}")
            return record
        if directory.exists():
            console.print(f"baseline {task_name}: incomplete or corrupt entry {directory}, rebuilding")
            shutil.rmtree(directory)
        console.print(f"baseline {task_name}: training into {directory}")
        return _train(cfg, task_name, directory, taskset)


def _train(cfg: DictConfig, task_name: str, directory: Path, taskset: TaskSet | None) -> BaselineRecord:
    started = time.perf_counter()
    bcfg = baseline_config(cfg)
    full = taskset if taskset is not None else build.build_taskset(bcfg)
    if task_name not in full.task_names:
        raise ValueError(f"baseline of task {task_name!r}: dataset {full.name} has tasks {', '.join(full.task_names)}")
    single = full.only(task_name)
    run = build_run(bcfg, directory, name=f"baseline {task_name}", taskset=single, diagnostics=False)
    try:
        run.trainer.fit()
        val = run.trainer.evaluate(run.trainer.taskset.val)
        test = run.trainer.test()
    finally:
        run.logger.close()
    trainer, model = run.trainer, run.model
    wall = time.perf_counter() - started
    task = single.tasks[0]
    record = BaselineRecord(
        task=task_name, key=directory.name, directory=directory, metrics=test.metrics[task_name],
        num_parameters=build.count_parameters(model), wall_time_s=wall, val_metrics=val.metrics[task_name], trained_now=True,
    )
    io.write_json(directory / RECORD_FILE, {
        "format": CACHE_FORMAT,
        "task": task_name,
        "task_spec": task.spec(),
        "input_shape": list(single.input_shape),
        "vocab_size": single.vocab_size,
        "metrics": record.metrics,
        "val_metrics": record.val_metrics,
        "selected_epoch": run.selection.best_epoch if run.selection is not None else trainer.state.epoch,
        "num_parameters": record.num_parameters,
        "wall_time_s": wall,
        "epochs": trainer.state.epoch,
        "key_material": key_material(cfg, task_name),
        "config": OmegaConf.to_container(bcfg, resolve=True),
        "checkpoint_sha256": _sha256(record.checkpoint_path),
    })
    return record


def load_baseline_model(record: BaselineRecord, device: torch.device | str = "cpu") -> SharingModel:
    """The trained single-task model of an entry (``HardSharing`` over its one task: the
    encoder is ``model.encoder``), rebuilt from the entry alone, in eval mode."""
    stored = json.loads((record.directory / RECORD_FILE).read_text())
    spec = dict(stored["task_spec"])
    spec["class_names"] = tuple(spec["class_names"])
    task = Task(**spec)
    config = OmegaConf.create(stored["config"])
    input_shape = tuple(stored["input_shape"])
    taskset_shape = TaskSet(name="", tasks=(task,), train=None, val=None, test=None, input_shape=input_shape,  # type: ignore[arg-type]
                            vocab_size=stored.get("vocab_size"))
    model = build.build_model(config, taskset_shape)
    best = checkpoints.checkpoint_dir(record.directory) / BEST_NAME  # trainer.select=best_val kept that epoch
    state = torch.load(best if best.is_file() else record.checkpoint_path, map_location="cpu", weights_only=False)["model"]
    model.load_state_dict(state)
    return model.to(device).eval()


def ensure_all(cfg: DictConfig, taskset: TaskSet, console: Console | None = None) -> dict[str, BaselineRecord]:
    """The baselines of every non-auxiliary task of the run. The run's taskset is reused
    unless an auxiliary task wraps the dataset: the baseline trains on the plain one."""
    plain = taskset if cfg.get("aux") is None else None
    return {t.name: ensure_baseline(cfg, t.name, taskset=plain, console=console) for t in taskset.tasks if not t.auxiliary}


# ------------------------------------------------------------- comparison
def delta_pct(mtl: float, stl: float, higher_is_better: bool) -> float | None:
    """``(-1)^l (M_mtl - M_stl) / |M_stl| * 100``, ``l = 1`` where lower is better: positive
    means the MTL model is better. ``None`` where undefined (a zero or non-finite baseline)."""
    if not (math.isfinite(mtl) and math.isfinite(stl)) or stl == 0:
        return None
    sign = 1.0 if higher_is_better else -1.0
    return sign * (mtl - stl) / abs(stl) * 100.0


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def compare(tasks: dict[str, Any], baselines: Mapping[str, Mapping[str, float]]) -> float | None:
    """Fill ``stl`` and ``delta_pct`` into a ``results.json`` ``tasks`` mapping, and each
    task's ``delta_pct_mean``; return Δm, the mean over all metrics of all non-auxiliary
    tasks (each metric counts once, so a task with more metrics weighs more, as in
    Maninis et al.). ``baselines`` maps task -> metric -> single-task value."""
    all_deltas: list[float] = []
    for name, entry in tasks.items():
        if name not in baselines:
            continue
        deltas = []
        for metric, values in entry["metrics"].items():
            values["stl"] = float(baselines[name][metric])
            values["delta_pct"] = delta_pct(float(values["mtl"]), values["stl"], bool(values["higher_is_better"]))
            if values["delta_pct"] is not None:
                deltas.append(values["delta_pct"])
        entry["delta_pct_mean"] = _mean(deltas)
        if not entry.get("auxiliary", False):
            all_deltas += deltas
    return _mean(all_deltas)


def split_block(
    tasks: tuple[Task, ...], metrics: Mapping[str, Mapping[str, float]], losses: Mapping[str, float],
    stl: Mapping[str, Mapping[str, float]] | None,
) -> dict[str, Any]:
    """One split's block of ``results.json`` (``val`` or ``test``): the MTL model's metrics
    and losses and, given the baselines' metrics on the same split, each metric's delta
    and Δm (the mean over the main tasks' metrics, as :func:`compare`)."""
    block: dict[str, Any] = {
        "metrics": {t.name: {m.name: float(metrics[t.name][m.name]) for m in t.metrics} for t in tasks},
        "losses": dict(losses),
    }
    if stl is None:
        return block
    deltas = {t.name: {m.name: delta_pct(float(metrics[t.name][m.name]), float(stl[t.name][m.name]), m.higher_is_better)
                       for m in t.metrics} for t in tasks if t.name in stl}
    block["delta_pct"] = deltas
    block["delta_m_pct"] = _mean([d for t in tasks if t.name in deltas and not t.auxiliary
                                  for d in deltas[t.name].values() if d is not None])
    return block


def validation_delta_m_score(tasks: tuple[Task, ...], records: Mapping[str, BaselineRecord]) -> Score:
    """``trainer.select=best_val``'s score when baselines exist: Δm of a validation result
    against the baselines' validation metrics (an undefined Δm never wins)."""
    stl = {name: r.val_metrics for name, r in records.items()}

    def score(result: EvalResult, history: Sequence[dict[str, Any]]) -> float:
        del history
        value = split_block(tasks, result.metrics, result.losses, stl).get("delta_m_pct")
        return -math.inf if value is None else float(value)

    return score


def add_to_results(results: dict[str, Any], records: Mapping[str, BaselineRecord]) -> None:
    """Add the single-task comparison to a run's ``results.json`` content: per-metric
    ``stl``/``delta_pct``, per-task ``delta_pct_mean``, ``delta_m_pct``, the summed size of
    the single-task models, and a ``baselines`` section (entries, their original training
    time, and the time spent training them in this run: 0 when all came from the cache)."""
    results["delta_m_pct"] = compare(results["tasks"], {name: r.metrics for name, r in records.items()})
    results["parameters"]["stl_sum"] = sum(r.num_parameters for r in records.values())
    results["baselines"] = {
        "tasks": {name: r.to_dict() for name, r in records.items()},
        "forward_passes_per_input": len(records),
        "wall_time_s": sum(r.wall_time_s for r in records.values()),
        "trained_this_run_s": sum(r.wall_time_s for r in records.values() if r.trained_now),
    }
