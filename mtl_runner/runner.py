"""One run, end to end: build from the config, train, test, compare, write results."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from mtl_runner import build, results
from mtl_runner.diagnostics import ConflictDiagnostics, custom_scalars_layout
from mtl_runner.train.logger import RunLogger
from mtl_runner.train.reference import evaluate_trivial, fit_trivial
from mtl_runner.train.trainer import Trainer, TrainerSettings


def settings_from(cfg: DictConfig) -> TrainerSettings:
    t = cfg.trainer
    return TrainerSettings(
        epochs=t.epochs, batch_size=t.batch_size, eval_batch_size=t.eval_batch_size, seed=t.seed,
        lr_schedule=t.lr_schedule, warmup_epochs=t.warmup_epochs, jacobian=t.jacobian,
        log_every_n_steps=t.log_every_n_steps, progress=t.progress,
    )


HPARAM_GROUPS = ("dataset", "backbone", "sharing", "balancer", "surgery", "optimizer")


def option_names(cfg: DictConfig, choices: dict[str, str] | None) -> dict[str, str]:
    """The option chosen in each group (Hydra's choices; else the ``_target_``'s name)."""
    names = {}
    for group in HPARAM_GROUPS:
        if choices and choices.get(group):
            names[group] = str(choices[group])
        else:
            names[group] = str(cfg[group]["_target_"]).rsplit(".", 1)[-1].lower()
    return names


def run_experiment(
    cfg: DictConfig, run_dir: Path, run_name: str | None = None, choices: dict[str, str] | None = None
) -> dict[str, Any]:
    started = time.perf_counter()
    run_dir = Path(run_dir)
    console = Console()
    device = build.resolve_device(cfg.trainer.device)
    taskset = build.build_taskset(cfg)
    torch.manual_seed(cfg.trainer.seed)
    model = build.build_model(cfg, taskset)
    balancer = build.build_balancer(cfg)
    surgery = build.build_surgery(cfg)

    logger = RunLogger(run_dir / "tb")
    logger.custom_scalars(custom_scalars_layout())
    diagnostics = ConflictDiagnostics(
        taskset.task_names, cfg.diagnostics.every_n_steps, cfg.diagnostics.warmup_steps, run_dir,
        space=surgery.space, histograms=cfg.diagnostics.histograms, console=console,
    )
    trainer = Trainer(
        model, taskset, balancer, surgery, build.optimizer_factory(cfg), settings_from(cfg), device,
        logger=logger, checkpoint_dir=run_dir / "checkpoints", name=run_name or run_dir.name,
        callbacks=[diagnostics],
    )
    try:
        trainer.fit()
        test = trainer.test()
        trivial = evaluate_trivial(taskset.tasks, fit_trivial(taskset.tasks, taskset.train, device), taskset.test, device)
        out: dict[str, Any] = {
            "run_name": run_name or run_dir.name,
            "status": "completed",
            "tasks": results.task_results(taskset.tasks, test.metrics, trivial),
            "test_losses": test.losses,
            "parameters": {"mtl": build.count_parameters(model)},
            "forward_passes_per_input": model.forward_passes_per_input,
            "device": str(device),
            "epochs": trainer.state.epoch,
            "steps": trainer.state.step,
            "jacobian_strategy": trainer.engine.strategy,
            "wall_time_s": time.perf_counter() - started,
            "config": OmegaConf.to_container(cfg, resolve=True),
        }
        results.write(run_dir, out)
        results.print_summary(out, console)
        hparams = {**option_names(cfg, choices), "lr": float(cfg.optimizer.lr), "seed": int(cfg.trainer.seed)}
        logger.hparams(hparams, results.final_metrics(out))
        return out
    finally:
        logger.close()
