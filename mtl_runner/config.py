"""The configuration schema and its validation.

Two layers, both run before any training (and before Hydra creates a run directory,
see :mod:`mtl_runner.preflight`):

1. The typed top-level schema (:class:`RunConfig`, registered in Hydra's ConfigStore as
   ``config_schema``) fixes the keys and types of the plain groups (trainer,
   diagnostics, ...). OmegaConf rejects unknown keys and wrong types on composition.
2. Groups that build objects through ``_target_`` (dataset, backbone, sharing, balancer,
   surgery, optimizer) are checked against the signature of their target: every key
   must be a parameter of the callable, and values must fit its annotations. One
   mechanism serves every option, including a user's own class named by ``_target_``,
   so an option's parameters are declared once, in its Python signature.

Every failure is a :class:`ConfigError` with a one-line message naming the key and what
is allowed.

Why this module is long: it is the whole schema (one dataclass per section, every value
rule, the key and type checks), kept in one file so that what a config may hold is read
in one place.
"""

from __future__ import annotations

import inspect
import math
import re
import types
import typing
from collections import abc
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from mtl_runner.checkpoints import checkpoint_file
from mtl_runner.errors import ConfigError, locate

#: The Hydra config tree every command composes (``mtl-run``, ``mtl-affinity``, the tests).
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

#: Settings that change how a run is shown or where it runs, never its results: sweep job
#: names (as conf/hydra/default.yaml's exclude_keys for single runs) and mtl-report's
#: columns leave them out.
PRESENTATION_KEYS = ("trainer.progress", "trainer.device")

TARGET_GROUPS = ("dataset", "backbone", "sharing", "balancer", "surgery", "optimizer")
#: Arguments the runner passes itself when it builds the object (not user-settable).
RUNTIME_ARGS: dict[str, frozenset[str]] = {
    "backbone": frozenset({"input_shape"}),
    "sharing": frozenset({"backbone", "tasks", "input_shape"}),
    "optimizer": frozenset({"params"}),
    "aux": frozenset({"taskset"}),
}


def _setting(allowed: Callable[[Any], bool], text: str) -> Any:
    """A ``TrainerConfig`` field: no default (the YAML holds it), and the rule its values
    must meet beyond their type (read by :data:`VALUE_RULES`)."""
    return field(default=MISSING, metadata={"allowed": (allowed, text)})


def _ge(low: int, text: str) -> Any:
    return _setting(lambda v: v >= low, text)


@dataclass
class TrainerConfig:
    """``trainer.*``: the trainer's settings themselves (:class:`mtl_runner.train.trainer.Trainer`
    takes an instance): each setting's type and allowed values here, its value (defaults
    included) in ``conf/trainer/default.yaml``, so a setting is written down once."""

    epochs: int = _ge(1, "an integer >= 1")
    batch_size: int = _ge(1, "an integer >= 1")
    max_batches_per_epoch: Optional[int] = _setting(lambda v: v is None or v >= 1, "null (the whole epoch) or an integer >= 1")
    eval_batch_size: int = _ge(1, "an integer >= 1")
    device: str = _setting(lambda v: v in ("auto", "cpu", "cuda") or v.startswith("cuda:"), "auto, cpu, cuda or cuda:N")
    seed: int = MISSING
    lr_schedule: str = _setting(lambda v: v in ("cosine", "constant", "step"), "cosine, constant or step")
    warmup_epochs: int = _ge(0, "an integer >= 0")
    lr_step_epochs: int = _ge(1, "an integer >= 1")
    lr_step_gamma: float = _setting(lambda v: 0 < v <= 1, "a float in (0, 1]")
    jacobian: str = _setting(lambda v: v in ("auto", "batched", "sequential"), "auto, batched or sequential")
    log_every_n_steps: int = _ge(1, "an integer >= 1")
    progress: str = _setting(lambda v: v in ("auto", "bar", "lines", "off"), "auto, bar, lines or off")
    num_workers: Optional[int] = _setting(lambda v: v is None or v >= 0, "null or an integer >= 0")
    checkpoint_every_n_steps: int = _ge(0, "an integer >= 0 (0: at epoch ends only)")
    on_nonfinite: str = _setting(lambda v: v in ("skip", "stop"), "skip or stop")
    max_nonfinite_steps: int = _ge(1, "an integer >= 1")
    grad_clip_norm: Optional[float] = _setting(lambda v: v is None or v > 0, "null or a float > 0")
    deterministic: bool = MISSING
    precision: str = _setting(lambda v: v in ("32", "bf16", "fp16"), "32, bf16 or fp16")
    compile: bool = MISSING
    channels_last: str = _setting(lambda v: v in ("auto", "always", "never"), "auto (on CUDA for image inputs), always or never")
    num_threads: Optional[int] = _setting(
        lambda v: v is None or v >= 1, "null (the launcher's share of the CPU cores) or an integer >= 1")
    strategy: str = _setting(lambda v: v in ("single", "ddp"), "single or ddp (under torchrun)")
    sync_batchnorm: bool = MISSING
    select: str = _setting(lambda v: v in ("last", "best_val"), "last or best_val (the epoch with the best validation score)")

    @classmethod
    def from_config(cls, cfg: DictConfig) -> TrainerConfig:
        """The settings of a composed run config (typed or, as a baseline's derived
        config, plain): its ``trainer`` node checked against these types."""
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), cfg.trainer))  # type: ignore[return-value]

    @classmethod
    def value_rules(cls) -> list[tuple[str, Callable[[Any], bool], str]]:
        """:data:`VALUE_RULES` entries of the fields that have a rule."""
        return [(f"trainer.{f.name}", *f.metadata["allowed"]) for f in fields(cls) if "allowed" in f.metadata]


@dataclass
class DiagnosticsConfig:
    """Types of ``diagnostics.*``; values in ``conf/diagnostics/*.yaml``."""

    every_n_steps: int = MISSING
    dense_steps: int = MISSING
    warmup_steps: int = MISSING
    histograms: bool = MISSING


@dataclass
class FinetuneConfig:
    """Types of ``finetune.*`` (see :mod:`mtl_runner.train.finetune`); values in
    ``conf/finetune/default.yaml``."""

    freeze_stages: int = MISSING
    unfreeze_every: int = MISSING
    lr_decay: float = MISSING
    reinit_heads: bool = MISSING


@dataclass
class BaselineConfig:
    """Types of ``baseline.*`` (see :mod:`mtl_runner.baselines`); values in
    ``conf/baseline/{on,off}.yaml``."""

    enabled: bool = MISSING
    root: str = MISSING


@dataclass
class AffinityConfig:
    """Types of ``affinity.*`` (``mtl-affinity`` only, see :mod:`mtl_runner.affinity`);
    values in ``conf/affinity/default.yaml``."""

    steps: int = MISSING
    every_n_steps: int = MISSING
    lookahead_lr: Optional[float] = None
    k: int = MISSING
    measures: list[str] = field(default_factory=list)
    cka_examples: int = MISSING
    transfer: bool = MISSING


@dataclass
class RunConfig:
    dataset: Any = None
    backbone: Any = None
    sharing: Any = None
    balancer: Any = None
    surgery: Any = None
    optimizer: Any = None
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    resume: Optional[str] = None
    #: ``+aux=rotation``: wraps the dataset with an auxiliary task (``_target_`` node).
    aux: Any = None
    #: Only ``mtl-affinity`` composes this node.
    affinity: Optional[AffinityConfig] = None
    init_from: Optional[str] = None
    objective: Optional[str] = None
    objective_on_test: bool = False


#: Paths into a run's ``results.json`` that ``objective`` may name (see :mod:`mtl_runner.sweep`);
#: the first three read the validation block, the others the test set.
OBJECTIVE_PATTERNS = (
    re.compile(r"val\.delta_m_pct"),
    re.compile(r"val\.(metrics|delta_pct)\.[^.]+\.[^.]+"),
    re.compile(r"val\.losses\.[^.]+"),
    re.compile(r"(test\.)?delta_m_pct"),
    re.compile(r"tasks\.[^.]+\.metrics\.[^.]+\.(mtl|delta_pct)"),
    re.compile(r"test\.(metrics|delta_pct)\.[^.]+\.[^.]+"),
    re.compile(r"(test_losses|test\.losses)\.[^.]+"),
)

#: ``affinity.measures`` a user may choose (one module each in ``mtl_runner/affinity/``).
AFFINITY_MEASURES = ("gradient", "lookahead", "cka")


#: (key, predicate, what is allowed) for values whose type alone does not say enough.
VALUE_RULES: list[tuple[str, Callable[[Any], bool], str]] = [
    *TrainerConfig.value_rules(),
    ("objective", lambda v: v is None or any(p.fullmatch(v) for p in OBJECTIVE_PATTERNS),
     "null, val.delta_m_pct, val.<metrics|delta_pct>.<task>.<metric>, val.losses.<task> (or, with objective_on_test=true, "
     "delta_m_pct, tasks.<task>.metrics.<metric>.<mtl|delta_pct>, test_losses.<task>)"),
    ("optimizer.lr", lambda v: math.isfinite(v) and v > 0, "a finite float > 0"),
    ("diagnostics.every_n_steps", lambda v: v >= 0, "an integer >= 0 (0 turns diagnostics off)"),
    ("diagnostics.dense_steps", lambda v: v >= 0, "an integer >= 0 (0: no dense phase)"),
    ("diagnostics.warmup_steps", lambda v: v >= 0, "an integer >= 0"),
    ("baseline.root", lambda v: bool(v.strip()), "a directory path for the baseline cache"),
    ("finetune.freeze_stages", lambda v: v >= 0, "an integer >= 0 (0: nothing frozen)"),
    ("finetune.unfreeze_every", lambda v: v >= 0, "an integer >= 0 (0: frozen stages stay frozen)"),
    ("finetune.lr_decay", lambda v: 0 < v <= 1, "a float in (0, 1] (1: the same rate everywhere)"),
    ("affinity.steps", lambda v: v >= 1, "an integer >= 1"),
    ("affinity.every_n_steps", lambda v: v >= 1, "an integer >= 1"),
    ("affinity.lookahead_lr", lambda v: v > 0, "null (the optimizer's lr) or a float > 0"),
    ("affinity.k", lambda v: v >= 1, "an integer >= 1 (number of shared encoders)"),
    ("affinity.measures", lambda v: len(v) > 0 and set(v) <= set(AFFINITY_MEASURES), f"a non-empty list of {', '.join(AFFINITY_MEASURES)}"),
    ("affinity.cka_examples", lambda v: v >= 2, "an integer >= 2"),
    ("init_from", lambda v: checkpoint_file(v) is not None, "a checkpoint .pt file or a run directory with checkpoints/last.pt"),
]


# Registered on import: conf/config.yaml names ``config_schema`` in its defaults, so any
# code that can import CONF_DIR from here can also compose it.
ConfigStore.instance().store(name="config_schema", node=RunConfig)


def validate(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for the first problem found in a composed config's keys
    and values; whether the chosen options fit together is for
    :func:`mtl_runner.build.check_compatible`, which builds some of them."""
    _check_schema_keys(cfg)
    for group in TARGET_GROUPS:
        node = cfg.get(group)
        if node is None:
            raise ConfigError(f"{group}: no option selected; choose one with {group}=NAME")
        validate_target_node(node, group)
    if cfg.get("aux") is not None:
        validate_target_node(cfg.aux, "aux")
    for key, ok, allowed in VALUE_RULES:
        value = OmegaConf.select(cfg, key, default=None)
        if value is None:
            continue
        try:
            good = ok(value)
        except TypeError:
            good = False
        if not good:
            raise ConfigError(f"{key}={value!r} is not allowed; expected {allowed}")
    if cfg.get("objective") is not None and not str(cfg.objective).startswith("val.") and not cfg.get("objective_on_test"):
        raise ConfigError(f"objective={cfg.objective} reads the test set; a search selects, so give a val.* path "
                          "(val.delta_m_pct), or set objective_on_test=true to tune on test knowingly")


#: Sections whose keys the typed schema fixes (the ``_target_`` groups are checked
#: against their target's signature instead).
TYPED_SECTIONS = {"trainer": TrainerConfig, "diagnostics": DiagnosticsConfig, "finetune": FinetuneConfig,
                  "baseline": BaselineConfig, "affinity": AffinityConfig}


def _check_schema_keys(cfg: DictConfig) -> None:
    """Keys added with ``+`` pass Hydra's struct check, so the schema is checked again
    here: every top-level key and every key of a typed section must be a field."""
    sections: list[tuple[str, Any, type]] = [("", cfg, RunConfig)]
    sections += [(f"{name}.", cfg.get(name), schema) for name, schema in TYPED_SECTIONS.items()]
    for prefix, node, schema in sections:
        if not isinstance(node, DictConfig):
            continue
        allowed = [f.name for f in fields(schema)]
        for key in node.keys():
            if key not in allowed and not (not prefix and key == "hydra"):
                raise ConfigError(f"unknown key {prefix}{key}; allowed: {', '.join(allowed)}")


def validate_target_node(node: Any, path: str) -> None:
    """Check a ``_target_`` node's keys and value types against its target's signature."""
    if not isinstance(node, DictConfig) or "_target_" not in node:
        raise ConfigError(f"{path}: expected a config with _target_, got {OmegaConf.to_yaml(node).strip()!r}")
    target_name = node["_target_"]
    try:
        target = locate(target_name)
    except Exception as exc:  # hydra raises ImportError or its own error types
        raise ConfigError(f"{path}._target_: cannot import {target_name!r} ({exc.__class__.__name__})") from None
    signature = inspect.signature(target)
    try:
        hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    except Exception:  # unresolvable annotations (third-party code): check names only
        hints = {}
    params = signature.parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    runtime = RUNTIME_ARGS.get(path.split(".")[0], frozenset())
    allowed = target_keys(target, path)
    for key in node.keys():
        if str(key).startswith("_") and str(key).endswith("_"):
            continue
        if key in runtime:
            raise ConfigError(f"{path}.{key} is set by the runner and cannot be configured")
        if key not in params:
            if accepts_any:
                continue
            raise ConfigError(
                f"unknown key {path}.{key} for {path.split('.')[0]}={_short(target_name)}; allowed: {', '.join(allowed) or '(none)'}"
            )
        value = OmegaConf.to_container(node[key], resolve=True) if isinstance(node[key], (DictConfig, ListConfig)) else node[key]
        annotation = hints.get(key)
        if annotation is not None and not _fits(value, annotation):
            raise ConfigError(f"{path}.{key}={value!r} is not {_describe(annotation)}")


def target_keys(target: Callable[..., Any], path: str) -> list[str]:
    """The keys a ``_target_`` node of group ``path`` may set: the target's named
    parameters, less those the runner passes itself."""
    runtime = RUNTIME_ARGS.get(path.split(".")[0], frozenset())
    params = inspect.signature(target).parameters.values()
    return sorted(p.name for p in params if p.name not in runtime and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))


def _short(target_name: str) -> str:
    return target_name.rsplit(".", 2)[-2] if target_name.count(".") >= 2 else target_name


def _fits(value: Any, annotation: Any) -> bool:
    """Whether a config value fits a (simple) type annotation; unknown forms pass."""
    if annotation is Any or (isinstance(value, dict) and "_target_" in value):
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in typing.get_args(annotation))
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    container = origin or annotation
    if container in (list, tuple, typing.Sequence, abc.Sequence):
        if not isinstance(value, (list, tuple)):
            return False
        args = typing.get_args(annotation)
        if container is tuple and args and Ellipsis not in args:  # tuple[A, B]: exactly two
            return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args))
        args = tuple(a for a in args if a is not Ellipsis)
        return not args or all(any(_fits(v, a) for a in args) for v in value)
    if container in (dict, typing.Mapping, abc.Mapping):
        if not isinstance(value, dict):
            return False
        args = typing.get_args(annotation)
        return len(args) != 2 or all(_fits(v, args[1]) for v in value.values())
    if isinstance(container, type):
        return isinstance(value, container)
    return True


def _describe(annotation: Any) -> str:
    names = {int: "an integer", float: "a float", bool: "true or false", str: "a string", type(None): "null"}
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(annotation))
    if origin is typing.Literal:
        return "one of " + ", ".join(map(str, typing.get_args(annotation)))
    if origin is tuple and typing.get_args(annotation) and Ellipsis not in typing.get_args(annotation):
        return f"a list of {len(typing.get_args(annotation))}: " + ", ".join(_describe(a) for a in typing.get_args(annotation))
    if origin in (list, tuple) or annotation in (list, tuple):
        return "a list"
    if origin is dict:
        return "a mapping"
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))
