"""From a config to a trainer ready to run: the one assembly every command uses.

``mtl-run`` (:mod:`mtl_runner.runner`), the single-task baselines
(:mod:`mtl_runner.baselines`, and through them transfer affinity), ``mtl-affinity``'s
joint run and the benchmark scripts all call :func:`build_run`, so that dataset, model,
fine-tuning, balancer, surgery, optimizer, settings, logging, checkpoints and
diagnostics are put together in one way; a caller says only what differs (a taskset it
already has, its own callbacks, where the files go).

:func:`mtl_runner.build.check_compatible`, the checks of choices that are each valid but
do not fit together, runs in the preflight of every job; :func:`build_run` runs it again
with the dataset in hand, for what only the data can tell.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from mtl_runner import build, checkpoints
from mtl_runner.config import TrainerConfig
from mtl_runner.data.base import TaskSet
from mtl_runner.diagnostics import ConflictDiagnostics, custom_scalars_layout
from mtl_runner.errors import ConfigError
from mtl_runner.models.sharing.base import SharingModel
from mtl_runner.train import distributed, finetune
from mtl_runner.train.callbacks import Checkpointing, TrainingLog
from mtl_runner.train.logger import RunLogger
from mtl_runner.train.selection import ModelSelection, normalised_loss_score
from mtl_runner.train.sharing_diagnostics import SharingDiagnostics
from mtl_runner.train.trainer import Callback, Trainer

def prepare_process(cfg: DictConfig) -> None:
    """Process-wide settings of a command: ``trainer.num_threads`` and
    ``trainer.deterministic`` (PyTorch's deterministic algorithms everywhere)."""
    if cfg.trainer.num_threads is not None:
        torch.set_num_threads(cfg.trainer.num_threads)
    if cfg.trainer.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


@dataclass
class Run:
    """A wired trainer and what it was built from. The caller closes ``logger``
    (the one it passed, or the one made for ``run_dir``)."""

    trainer: Trainer
    taskset: TaskSet
    model: SharingModel
    device: torch.device
    logger: RunLogger
    selection: ModelSelection | None = None


def build_run(
    cfg: DictConfig,
    run_dir: Path | None,
    *,
    name: str = "mtl",
    taskset: TaskSet | None = None,
    model: SharingModel | None = None,
    logger: RunLogger | None = None,
    callbacks: Sequence[Callback] = (),
    diagnostics: bool = True,
    group: distributed.DataParallel | None = None,
    console: Console | None = None,
    resume_step: int | None = None,
) -> Run:
    """The trainer of ``cfg``.

    ``run_dir``: where the run's files go (its TensorBoard events, so that TensorBoard names the run by the directory alone; checkpoints,
    the diagnostics and fine-tuning reports); ``None`` writes none, and ``logger`` (if
    given) receives the curves. ``taskset``/``model``: already built by the caller (the
    model is otherwise built from the seed). ``callbacks`` join the standard ones;
    ``diagnostics`` adds the conflict and sharing diagnostics. ``group``: this rank of a
    ddp group (rank 0 alone writes). ``resume_step``: the step a resumed run restarts
    from; TensorBoard events from there on are dropped, and a dataset that fits statistics
    on its training split reads the run's own back (``data_summary.json``). Choices that turn out not to fit
    together while wiring raise :class:`ConfigError`. Under ``trainer.select=best_val``
    the run's :class:`ModelSelection` scores by the mean normalised validation loss
    until its caller hands it a better score (the runner: validation Δm)."""
    main = group is None or group.is_main
    device = build.resolve_device(cfg.trainer.device)
    if group is not None:
        device = distributed.device_for(group, device)
    taskset = taskset if taskset is not None else build.build_taskset(cfg, run_dir if resume_step is not None else None)
    build.check_compatible(cfg, taskset)
    if model is None:
        torch.manual_seed(cfg.trainer.seed)
        model = build.build_model(cfg, taskset)
    if group is not None and cfg.trainer.sync_batchnorm:
        model = distributed.sync_batchnorm(model, device)
    files_dir = run_dir if main else None  # rank 0 alone writes
    param_groups, finetune_callbacks = finetune.setup(model, cfg, console, files_dir, resuming=resume_step is not None)
    balancer = build.build_balancer(cfg)
    surgery = build.build_surgery(cfg)
    own_logger = logger is None
    if logger is None:
        logger = RunLogger(Path(files_dir) if files_dir is not None else None, purge_step=resume_step)
        logger.custom_scalars(custom_scalars_layout(taskset.task_names))
    wired: list[Callback] = []
    if diagnostics:
        wired += [ConflictDiagnostics(
            taskset.task_names, cfg.diagnostics.every_n_steps, cfg.diagnostics.warmup_steps, files_dir,
            space=surgery.space, histograms=cfg.diagnostics.histograms, console=console,
            dense_steps=cfg.diagnostics.dense_steps,
        ), SharingDiagnostics()]
    wired += [*finetune_callbacks, *callbacks, TrainingLog()]
    selection = None
    if cfg.trainer.select == "best_val":
        selection = ModelSelection(normalised_loss_score,
                                   checkpoints.checkpoint_dir(run_dir) if files_dir is not None else None)
        wired.append(selection)
    if run_dir is not None:
        config = OmegaConf.to_container(cfg, resolve=True)
        wired.append(Checkpointing(checkpoints.checkpoint_dir(run_dir), cfg.trainer.checkpoint_every_n_steps, config))  # type: ignore[arg-type]
    try:
        trainer = Trainer(
            model, taskset, balancer, surgery, build.optimizer_factory(cfg), TrainerConfig.from_config(cfg), device,
            logger=logger, callbacks=wired, name=name, param_groups=param_groups, distributed=group,
        )
    except ValueError as exc:  # a method refusing the model or data it was given
        if own_logger:
            logger.close()
        raise ConfigError(str(exc).splitlines()[0]) from None
    return Run(trainer, taskset, model, device, logger, selection)
