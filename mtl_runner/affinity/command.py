"""``mtl-affinity``: which tasks belong together?

Same Hydra config as ``mtl-run`` (``conf/mtl_affinity.yaml`` = ``config.yaml`` plus the
``affinity`` node of ``conf/affinity/default.yaml``). One command measures, per task pair:

- ``gradient`` (:mod:`.gradient`): mean cosine of the task gradients on the shared
  parameters, and ``lookahead`` (:mod:`.lookahead`): TAG's inter-task affinity, both
  during a short joint training run (``affinity.steps`` steps of the configured model,
  balancer, surgery and optimizer);
- ``cka`` (:mod:`.cka`): linear CKA between the single-task baselines' representations
  (baselines from :mod:`mtl_runner.baselines`, cached and shared with ``mtl-run``);
- with ``affinity.transfer=true`` (:mod:`.transfer`): the transfer matrix, each task's
  baseline fine-tuned on every other task vs that task from scratch.

Then :func:`~mtl_runner.affinity.outputs.write_outputs` writes every matrix, its
heatmap, dendrogram and recommended grouping into ``outputs/affinity/<date>_<time>/``.
A new measure is one module beside these, a name in ``config.AFFINITY_MEASURES`` and
one branch in :func:`run_affinity` that adds its :class:`AffinityMatrix`.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from mtl_runner import baselines, build
from mtl_runner.affinity.cka import cka_matrix, held_out_inputs
from mtl_runner.affinity.gradient import GradientAffinity
from mtl_runner.affinity.lookahead import LookaheadAffinity
from mtl_runner.affinity.outputs import AffinityMatrix, write_outputs
from mtl_runner.affinity.transfer import transfer_affinity
from mtl_runner.assemble import build_run, prepare_process
from mtl_runner.config import CONF_DIR, validate
from mtl_runner.data.base import TaskSet
from mtl_runner.errors import ConfigError, option_name
from mtl_runner.preflight import fail, preflight
from mtl_runner.train.logger import RunLogger


@dataclass
class Context:
    """What the measures share: the config, the dataset, the device, the log."""

    cfg: DictConfig
    taskset: TaskSet
    device: torch.device
    logger: RunLogger
    console: Console


def joint_run(ctx: Context, measures: list[str]) -> dict[str, AffinityMatrix]:
    """Train the configured multi-task model for ``affinity.steps`` steps and measure the
    gradient and/or lookahead affinity on every ``affinity.every_n_steps``-th step."""
    cfg, aff = ctx.cfg, ctx.cfg.affinity
    gradient = GradientAffinity(aff.every_n_steps)
    trainer = build_run(cfg, None, name="affinity", taskset=ctx.taskset, logger=ctx.logger, callbacks=[gradient],
                        diagnostics=False).trainer
    if not trainer.engine.shared:
        raise ConfigError(f"mtl-affinity measures on shared parameters; sharing={option_name(trainer.model)} has none (use sharing=hard)")
    lr = float(aff.lookahead_lr if aff.lookahead_lr is not None else cfg.optimizer.lr)
    lookahead = LookaheadAffinity(trainer, lr, aff.every_n_steps) if "lookahead" in measures else None
    names = list(ctx.taskset.task_names)
    pairs = [f"{a}->{b}" for a in names for b in names if a != b]
    off_diagonal = ~torch.eye(len(names), dtype=torch.bool, device=ctx.device)
    step = 0
    while step < aff.steps:
        batches = trainer.taskset.train.batches(cfg.trainer.batch_size, shuffle=True, generator=trainer.data_generator, device=ctx.device)
        for batch in batches:
            before = lookahead.snapshot() if lookahead is not None and lookahead.measures_step(step) else None
            outcome = trainer.train_step(batch)
            ctx.logger.scalars([f"loss/train/{n}" for n in names], outcome.losses, step)
            if before is not None and outcome.applied and outcome.grads.jacobian is not None:
                z = lookahead.measure(before, batch, outcome.grads.jacobian)  # type: ignore[union-attr]
                ctx.logger.scalars([f"lookahead/{p}" for p in pairs], z[off_diagonal], step)
            step += 1
            if step >= aff.steps:
                break
        ctx.logger.flush()
    out = {}
    if "gradient" in measures:
        out["gradient"] = AffinityMatrix(names, gradient.matrix())
    if lookahead is not None:
        z = lookahead.matrix()
        out["lookahead"] = AffinityMatrix(names, z)
        overshoot = [name for name, own in zip(names, z.diagonal().tolist()) if own < 0]
        if overshoot:
            ctx.console.print(
                f"[yellow]warning:[/yellow] a lookahead step on its own loss raised the loss of {', '.join(overshoot)}: "
                f"affinity.lookahead_lr={lr:g} is too large for that loss scale; lower it for a meaningful lookahead affinity"
            )
    return out


def cka_measure(ctx: Context) -> dict[str, AffinityMatrix]:
    """CKA between the single-task baselines of the tasks; auxiliary tasks have no
    baseline (see :mod:`mtl_runner.baselines`) and are left out."""
    models = {}
    for task in ctx.taskset.tasks:
        if task.auxiliary:
            continue
        record = baselines.ensure_baseline(ctx.cfg, task.name, taskset=ctx.taskset, console=ctx.console)
        models[task.name] = baselines.load_baseline_model(record, ctx.device)
    inputs = held_out_inputs(ctx.taskset.val, ctx.cfg.affinity.cka_examples, ctx.device)
    return {"cka": AffinityMatrix(list(models), cka_matrix(models, inputs, ctx.cfg.trainer.eval_batch_size))}


def run_affinity(cfg: DictConfig, out_dir: Path, console: Console | None = None) -> dict[str, Any]:
    """Measure, write and return ``affinity.json``'s content."""
    started = time.perf_counter()
    console = console or Console()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prepare_process(cfg)
    device = build.resolve_device(cfg.trainer.device)
    taskset = build.build_taskset(cfg)
    measures = list(cfg.affinity.measures)
    logger = RunLogger(out_dir / "tb")
    ctx = Context(cfg, taskset, device, logger, console)
    try:
        matrices: dict[str, AffinityMatrix] = {}
        joint = [m for m in measures if m in build.JOINT_RUN_MEASURES]
        if joint:
            matrices.update(joint_run(ctx, joint))
        if "cka" in measures:
            matrices.update(cka_measure(ctx))
        if cfg.affinity.transfer:
            matrices["transfer"] = AffinityMatrix(*transfer_affinity(cfg, taskset, out_dir, console))
        extra = {"wall_time_s": time.perf_counter() - started, "config": OmegaConf.to_container(cfg, resolve=True)}
        return write_outputs(out_dir, matrices, int(cfg.affinity.k), logger, extra, console)
    finally:
        logger.close()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="mtl_affinity")
def _hydra_main(cfg: DictConfig) -> None:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        validate(cfg)
        run_affinity(cfg, out_dir)
    except ConfigError as exc:
        fail(str(exc))


def main() -> None:
    """``mtl-affinity``: validate every job first (one-line errors), then run."""
    sys.argv += preflight(sys.argv[1:], config_name="mtl_affinity")
    _hydra_main()
