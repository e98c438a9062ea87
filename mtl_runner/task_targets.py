"""A task's own loss and metrics, named by ``_target_`` in ``dataset.tasks.<task>``
(docs/own-data.md#your-own-loss-and-metrics).

:func:`build_callable` turns one such node into the object the task calls: a class is
constructed with the node's other keys (``torch.nn.HuberLoss``, a torchmetrics class); a
function is used as it is, or with the other keys bound (``functools.partial``), because a
function is what the task calls on the entries, not a factory. Both the preflight and the run
build through it, so a bad node fails before anything is written.

A metric of one's own (:class:`UserMetric`) declares its direction, which Δm, the per-task
deltas, ``results.json`` and ``mtl-report`` read exactly as they read a built-in metric's.
It is evaluated on the labelled entries of groups of batches (``mtl_runner.tasks``
selects them, a group at a time) in one of two forms:

* an object with ``update(pred, target)`` and ``compute()`` (a torchmetrics ``Metric``):
  every evaluation updates a fresh copy of it on the model's device and reads it back once;
* a function ``(pred, target) -> scalar``: the value of one group. The split's value is the
  mean of the group values weighted by each group's number of labelled entries (exact for a
  metric that is a mean over entries), summed on the device in float64 and read back once.
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from mtl_runner.errors import ConfigError, locate

__all__ = ["UserMetric", "UserMetricAccumulator", "build_callable", "user_metric", "parse_metrics", "is_stateful_metric"]


def is_stateful_metric(value: Any) -> bool:
    """A metric object that accumulates itself (torchmetrics' protocol) rather than a function."""
    return callable(getattr(value, "update", None)) and callable(getattr(value, "compute", None))


def build_callable(key: str, node: Any) -> Any:
    """The object of a ``{_target_: ..., <keys>}`` node; bad input is one line naming ``key``."""
    if not isinstance(node, Mapping) or "_target_" not in node:
        raise ConfigError(f"{key}: expected {{_target_: <class or function>, ...}}, got {node!r}")
    target_name = str(node["_target_"])
    arguments = {str(k): v for k, v in node.items() if k != "_target_"}
    try:
        target = locate(target_name)
    except Exception:
        raise ConfigError(f"{key}._target_: cannot import {target_name!r}; give a class or function by its import path") from None
    if not callable(target):
        raise ConfigError(f"{key}._target_: {target_name} is a {type(target).__name__}, not a class or a function")
    if not inspect.isclass(target):
        return functools.partial(target, **arguments) if arguments else target
    try:
        built = target(**arguments)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{key}: {target_name}({', '.join(arguments)}) failed: {str(exc).splitlines()[0]}") from None
    if not (callable(built) or is_stateful_metric(built)):
        raise ConfigError(f"{key}._target_: {target_name} builds a {type(built).__name__}, which is neither callable nor a metric with update/compute")
    return built


class UserMetricAccumulator(Protocol):
    def update(self, pred: Tensor, target: Tensor, labelled: Tensor) -> None: ...
    def compute(self) -> float: ...


@dataclass(frozen=True)
class UserMetric:
    """A metric of one's own: its name, its direction, and the function or metric object
    (a template: each evaluation works on a fresh copy)."""

    name: str
    higher_is_better: bool
    definition: Callable[..., Any]

    def accumulator(self, device: torch.device) -> UserMetricAccumulator:
        if is_stateful_metric(self.definition):
            return _StatefulAccumulator(self, device)
        return _WeightedMeanAccumulator(self, device)


def user_metric(key: str, name: str, node: Any) -> UserMetric:
    """``dataset.tasks.<task>.metrics.<name>``: ``{_target_, higher_is_better, <keys>}``."""
    if not isinstance(node, Mapping) or "_target_" not in node:
        raise ConfigError(f"{key}: a metric of your own is {{_target_: <class or function>, higher_is_better: true|false, ...}}, got {node!r}")
    direction = node.get("higher_is_better")
    if not isinstance(direction, bool):
        raise ConfigError(f"{key}.higher_is_better is required: true or false (the direction Δm and mtl-report compare in)")
    definition = build_callable(key, {k: v for k, v in node.items() if k != "higher_is_better"})
    return UserMetric(name, direction, definition)


def parse_metrics(key: str, node: Any, builtin: Collection[str]) -> tuple[tuple[str, ...], tuple[UserMetric, ...]]:
    """``dataset.tasks.<task>.metrics``: the built-in metrics chosen and the metrics of one's own.

    A list names built-in metrics; a mapping may also define metrics of one's own
    (``name: {_target_, higher_is_better, ...}``) beside built-ins given without a value
    (``mse: null``). Own metrics are added to the chosen built-ins, which are the kind's
    defaults when none is named."""
    if node is None:
        return (), ()
    if isinstance(node, str) or not isinstance(node, (Mapping, Sequence)):
        raise ConfigError(f"{key}: a list of built-in metrics or a mapping name -> {{_target_: ..., higher_is_better: ...}}, got {node!r}")
    entries = node.items() if isinstance(node, Mapping) else ((name, None) for name in node)
    names: list[str] = []
    own: list[UserMetric] = []
    for name, definition in entries:
        name = str(name)
        if definition is None:
            if name not in builtin:
                raise ConfigError(f"{key}: unknown metric {name!r}; built-in: {', '.join(builtin)}; "
                                  f"one of your own: {{{name}: {{_target_: ..., higher_is_better: true|false}}}}")
            names.append(name)
        elif name in builtin:
            raise ConfigError(f"{key}.{name}: is the name of a built-in metric of this kind; give yours another name")
        else:
            own.append(user_metric(f"{key}.{name}", name, definition))
    return tuple(names), tuple(own)


def _one_number(metric: UserMetric, value: Any, device: torch.device | None = None) -> Tensor:
    """A metric's value as a 0-d float64 tensor; anything else is an error naming the metric."""
    tensor = torch.as_tensor(value, dtype=torch.float64, device=device)
    if tensor.numel() != 1:
        raise ValueError(f"metric {metric.name!r}: must give one number (per call, and from compute), got shape {tuple(tensor.shape)}")
    return tensor.reshape(())


class _StatefulAccumulator:
    """A fresh copy of the metric object on the device; under ``trainer.strategy=ddp`` a
    torchmetrics metric combines its ranks' states itself in ``compute()``."""

    def __init__(self, metric: UserMetric, device: torch.device) -> None:
        self.metric = metric
        self.state = copy.deepcopy(metric.definition)
        to_device = getattr(self.state, "to", None)
        if callable(to_device):
            self.state = to_device(device)

    def update(self, pred: Tensor, target: Tensor, labelled: Tensor) -> None:
        self.state.update(pred, target)

    def compute(self) -> float:
        return float(_one_number(self.metric, self.state.compute()))


class _WeightedMeanAccumulator:
    """Values of groups of entries weighted by their labelled-entry counts; ``sums`` is additive, so ddp
    sums it over ranks like a built-in accumulator's statistics."""

    def __init__(self, metric: UserMetric, device: torch.device) -> None:
        self.metric = metric
        self.sums = torch.zeros(2, dtype=torch.float64, device=device)

    def update(self, pred: Tensor, target: Tensor, labelled: Tensor) -> None:
        value = _one_number(self.metric, self.metric.definition(pred, target), self.sums.device)
        count = labelled.to(torch.float64)
        # a group without labels adds nothing (its value, often NaN, is not read)
        self.sums += torch.stack([torch.where(count > 0, value * count, 0.0), count])

    def compute(self) -> float:
        total, count = self.sums.tolist()
        return total / count if count > 0 else float("nan")
