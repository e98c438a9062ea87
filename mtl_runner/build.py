"""Objects from a validated config: dataset, model, balancer, surgery, optimizer; and the
check that the chosen options fit together (:func:`check_compatible`), which needs some
of them built."""

from __future__ import annotations

import inspect
from functools import partial
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from mtl_runner.data import summary as data_summary
from mtl_runner.data.base import TaskSet
from mtl_runner.errors import ConfigError, locate
from mtl_runner.models.sharing.base import SharingModel
from mtl_runner.optim.balancers.base import Balancer
from mtl_runner.optim.jacobian.engine import check_task_subset
from mtl_runner.optim.surgery.base import Surgery


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={name}: CUDA is not available on this machine; use trainer.device=auto or cpu")
    return device


def _instantiate(node: DictConfig, key: str, recursive: bool = True, **runtime: Any) -> Any:
    """Instantiate a group, turning the target's own argument checks into ConfigErrors.

    Runtime objects (tasks, factories) are passed to the callable directly rather than
    through Hydra, which would convert them into configs. ``recursive=False`` hands nested
    ``_target_`` nodes over as plain dicts, for a target that builds them itself."""
    try:
        return instantiate(node, _convert_="all", _partial_=True, _recursive_=recursive)(**runtime)
    except ConfigError:
        raise
    except Exception as exc:
        cause = exc
        while cause.__cause__ is not None and not isinstance(cause, ConfigError):
            cause = cause.__cause__
        if isinstance(cause, (ValueError, FileNotFoundError, KeyError)):
            raise ConfigError(str(cause).splitlines()[0] if str(cause) else f"{key}: {type(cause).__name__}") from None
        raise


def build_taskset(cfg: DictConfig, resumed_run: Path | None = None) -> TaskSet:
    """The dataset, with the auxiliary task of ``+aux=...`` added when one is chosen.
    ``resumed_run``: the run directory a resumed run continues; a dataset that fits
    statistics on its training split (its callable takes ``statistics``) reads that run's
    back instead of fitting them again."""
    saved = {}
    if resumed_run is not None and (Path(resumed_run) / data_summary.FILE_NAME).is_file() and _takes(cfg.dataset, "statistics"):
        saved = {"statistics": str(resumed_run)}
    # A dataset builds its tasks' nested nodes (a loss or metric by _target_, with keys such as
    # higher_is_better that are not the target's) itself, the same way in the preflight.
    taskset = _instantiate(cfg.dataset, "dataset", recursive=False, **saved).with_num_workers(cfg.trainer.num_workers)
    if cfg.get("aux") is not None:
        taskset = _instantiate(cfg.aux, "aux", taskset=taskset)
    return taskset


def build_model(cfg: DictConfig, taskset: TaskSet) -> SharingModel:
    tokens = {} if taskset.vocab_size is None else {"vocab_size": taskset.vocab_size}
    backbone = partial(instantiate(cfg.backbone, _convert_="all", _partial_=True), input_shape=tuple(taskset.input_shape), **tokens)
    return _instantiate(cfg.sharing, "sharing", backbone=backbone, tasks=taskset.tasks, input_shape=tuple(taskset.input_shape))


def build_balancer(cfg: DictConfig) -> Balancer:
    return _instantiate(cfg.balancer, "balancer")


def build_surgery(cfg: DictConfig) -> Surgery:
    return _instantiate(cfg.surgery, "surgery")


def optimizer_factory(cfg: DictConfig) -> Any:
    """``optimizer.fused=null`` means fused kernels on CUDA: one kernel launch per step,
    and the trainer can then skip a non-finite step on the device, without a host sync.
    ``optimizer.foreach=null`` means the multi-tensor update wherever the kernels are not
    fused: torch's default on the CPU is a Python loop over the parameter tensors, which
    with many task heads costs more than the update's arithmetic (docs/performance.md,
    many tasks); the multi-tensor update gives the same values, bit for bit."""
    runtime: dict[str, Any] = {}
    fused = cfg.optimizer.get("fused")
    if "fused" in cfg.optimizer and fused is None:
        fused = runtime["fused"] = resolve_device(cfg.trainer.device).type == "cuda"
    if "foreach" in cfg.optimizer and cfg.optimizer.foreach is None:
        runtime["foreach"] = not fused
    return lambda groups: _instantiate(cfg.optimizer, "optimizer", params=groups, **runtime)


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


#: ``affinity.measures`` taken during a joint training run, on the shared parameters.
JOINT_RUN_MEASURES = ("gradient", "lookahead")


def check_compatible(cfg: DictConfig, taskset: TaskSet | None = None) -> None:
    """Raise a one-line :class:`ConfigError` when chosen options do not fit together.
    Without ``taskset`` the checks that need the data wait for
    :func:`mtl_runner.assemble.build_run`, which passes it."""
    trainer = cfg.trainer
    if trainer.sync_batchnorm and trainer.strategy != "ddp":
        raise ConfigError("trainer.sync_batchnorm=true needs trainer.strategy=ddp (one process has no other ranks to sync with)")
    ft = cfg.get("finetune")
    if ft is not None and ft.reinit_heads and not cfg.get("init_from"):
        raise ConfigError("finetune.reinit_heads=true needs init_from=<checkpoint or run dir>: without it every head is fresh already")
    if ft is not None and ft.unfreeze_every > 0 and ft.freeze_stages == 0:
        raise ConfigError(f"finetune.unfreeze_every={ft.unfreeze_every} needs finetune.freeze_stages >= 1 (stages to unfreeze)")
    _check_token_inputs(cfg)
    surgery = build_surgery(cfg)
    try:
        check_task_subset(build_balancer(cfg), surgery)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    space = surgery.space
    affinity = cfg.get("affinity")
    if affinity is not None and set(affinity.measures) & set(JOINT_RUN_MEASURES) and space != "params":
        raise ConfigError("mtl-affinity measures on the shared parameters: use surgery.space=params")
    if taskset is not None and taskset.multi_input and space == "features":
        raise ConfigError(
            f"surgery.space=features needs one representation shared by all tasks, but dataset={taskset.name} "
            "gives each task its own inputs: use surgery.space=params"
        )


#: Sharing strategies that run on ``(B, L, D)`` token sequences of varying length (the
#: gated ones read the raw inputs as one fixed-size vector).
TOKEN_SHARING = ("hard", "none", "soft", "cross_stitch", "learning_to_branch", "mtan", "film")


def _takes(node: DictConfig, argument: str) -> bool:
    try:
        target = locate(str(node._target_))
    except Exception:  # config.validate reports an unimportable target
        return False
    return argument in inspect.signature(target).parameters


def _check_token_inputs(cfg: DictConfig) -> None:
    """Text datasets (their callable takes a ``tokenizer``) give token ids, which only text
    backbones (their class takes the ``vocab_size`` of the ids) read."""
    text_data, text_backbone = _takes(cfg.dataset, "tokenizer"), _takes(cfg.backbone, "vocab_size")
    dataset = str(cfg.dataset._target_).rsplit(".", 1)[-1]
    backbone = str(cfg.backbone._target_).rsplit(".", 1)[-1]
    if text_data and not text_backbone:
        raise ConfigError(f"dataset={dataset} gives token ids: use backbone=transformer or backbone=hf, not {backbone}")
    if text_backbone and not text_data:
        raise ConfigError(f"backbone {backbone} reads token ids: use a text dataset (dataset=tagging_corpus, conll or text_table), not {dataset}")
    sharing = str(cfg.sharing._target_).rsplit(".", 2)[-2]
    if text_data and sharing not in TOKEN_SHARING:
        raise ConfigError(f"sharing={sharing} does not run on token sequences yet; allowed with text datasets: {', '.join(TOKEN_SHARING)}")
