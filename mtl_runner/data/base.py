"""What every dataset module yields: a :class:`TaskSet` with its tasks and three splits.

In-memory datasets (the generated ones, small benchmarks) use :class:`TensorSplit`,
which slices pre-built tensors, optionally already on the training device, so the data
pipeline never costs more than an index per step. Datasets read from disk use
:class:`LoaderSplit`, a ``torch.utils.data.DataLoader`` with workers sized to the machine
and pinned memory. The trainer only sees ``split.batches(...)``.

A batch is ``(inputs, targets)``: ``inputs`` a tensor, ``targets`` a dict task -> tensor.
Multi-input datasets (each task has its own inputs; one mini-batch per task per step)
set ``TaskSet.multi_input`` and yield ``(inputs, targets)`` with ``inputs`` also a dict
task -> tensor.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, Union

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from mtl_runner.tasks import Task

Inputs = Union[Tensor, dict[str, Tensor]]
Batch = tuple[Inputs, dict[str, Tensor]]


class Split(Protocol):
    def __len__(self) -> int: ...

    def batches(
        self, batch_size: int, *, shuffle: bool, generator: torch.Generator | None, device: torch.device
    ) -> Iterator[Batch]: ...


def _to_device(value: Inputs, device: torch.device) -> Inputs:
    if isinstance(value, dict):
        return {k: v.to(device, non_blocking=True) for k, v in value.items()}
    return value.to(device, non_blocking=True)


class TensorSplit:
    """A split held as tensors: ``inputs`` (N, ...) and ``targets`` task -> (N, ...).

    Shuffling draws a permutation from the run's generator on the CPU, so the batch order
    for a seed is the same whatever the device.
    """

    def __init__(self, inputs: Tensor, targets: dict[str, Tensor]) -> None:
        sizes = {len(inputs)} | {len(t) for t in targets.values()}
        if len(sizes) != 1:
            raise ValueError(f"inputs and targets disagree in length: {sorted(sizes)}")
        self.inputs = inputs
        self.targets = targets

    def __len__(self) -> int:
        return len(self.inputs)

    @property
    def nbytes(self) -> int:
        return self.inputs.nbytes + sum(t.nbytes for t in self.targets.values())

    def to(self, device: torch.device) -> TensorSplit:
        return TensorSplit(self.inputs.to(device), {k: v.to(device) for k, v in self.targets.items()})

    def batches(
        self, batch_size: int, *, shuffle: bool, generator: torch.Generator | None, device: torch.device
    ) -> Iterator[Batch]:
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else None
        if order is not None and self.inputs.device.type != "cpu":
            order = order.to(self.inputs.device)
        pin = device.type == "cuda" and self.inputs.device.type == "cpu"
        for start in range(0, n, batch_size):
            if order is None:
                index = slice(start, start + batch_size)
                x = self.inputs[index]
                y = {k: v[index] for k, v in self.targets.items()}
            else:
                idx = order[start : start + batch_size]
                x = self.inputs.index_select(0, idx)
                y = {k: v.index_select(0, idx) for k, v in self.targets.items()}
            if pin:
                x, y = x.pin_memory(), {k: v.pin_memory() for k, v in y.items()}
            yield _to_device(x, device), {k: v.to(device, non_blocking=True) for k, v in y.items()}


class LoaderSplit:
    """A split backed by a map-style ``Dataset`` returning ``(input, {task: target})``."""

    def __init__(self, dataset: Dataset, num_workers: int | None = None) -> None:
        self.dataset = dataset
        self.num_workers = default_num_workers() if num_workers is None else num_workers

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def batches(
        self, batch_size: int, *, shuffle: bool, generator: torch.Generator | None, device: torch.device
    ) -> Iterator[Batch]:
        loader = DataLoader(
            self.dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=self.num_workers,
            pin_memory=device.type == "cuda",
            persistent_workers=False,
        )
        for x, y in loader:
            yield _to_device(x, device), {k: v.to(device, non_blocking=True) for k, v in y.items()}


def default_num_workers() -> int:
    """Leave one core to the training process; none at all on a 1-2 core machine, where
    worker start-up costs more than it saves."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 0 if cores <= 2 else min(8, cores - 1)


@dataclass
class TaskSet:
    """A dataset's tasks and splits; ``input_shape`` excludes the batch dimension.
    ``preprocessing`` (JSON-able) records what was fitted on the training split, such as
    a table's input statistics, for the run directory's ``data_summary.json``.
    ``vocab_size``: inputs are token ids below it (text datasets); the from-scratch text
    encoder sizes its embedding with it (:func:`mtl_runner.build.build_model`)."""

    name: str
    tasks: tuple[Task, ...]
    train: Split
    val: Split
    test: Split
    input_shape: tuple[int, ...]
    multi_input: bool = False
    preprocessing: dict[str, Any] = field(default_factory=dict)
    vocab_size: int | None = None

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tasks)

    def on_device(self, device: torch.device, budget_fraction: float = 0.25) -> TaskSet:
        """The splits held in memory moved to ``device`` once, when they fit in
        ``budget_fraction`` of its free memory, so that a GPU run never waits on
        host-to-device copies of the built-in or fixture-sized datasets. Splits read from
        disk (``LoaderSplit``) keep their workers and pinned, non-blocking copies."""
        if device.type != "cuda":
            return self
        movable = [split for split in (self.train, self.val, self.test) if hasattr(split, "to") and hasattr(split, "nbytes")]
        free, _ = torch.cuda.mem_get_info(device)
        if not movable or sum(split.nbytes for split in movable) > budget_fraction * free:
            return self
        moved = [split.to(device) if any(split is m for m in movable) else split for split in (self.train, self.val, self.test)]
        return replace(self, train=moved[0], val=moved[1], test=moved[2])

    def with_num_workers(self, num_workers: int | None) -> TaskSet:
        """``trainer.num_workers`` given to the splits read from disk (``None`` keeps the
        machine-sized default); in-memory splits have no workers."""
        if num_workers is not None:
            for split in (self.train, self.val, self.test):
                if isinstance(split, LoaderSplit):
                    split.num_workers = num_workers
        return self

    def only(self, task_name: str) -> TaskSet:
        """The same data restricted to one task: the single-task baseline's dataset."""
        keep = tuple(t for t in self.tasks if t.name == task_name)
        if not keep:
            raise KeyError(task_name)
        return replace(
            self, tasks=keep, train=_restrict(self.train, task_name), val=_restrict(self.val, task_name),
            test=_restrict(self.test, task_name),
        )


class _RestrictedSplit:
    def __init__(self, split: Split, task_name: str) -> None:
        self.split = split
        self.task_name = task_name

    def __len__(self) -> int:
        return len(self.split)

    def batches(
        self, batch_size: int, *, shuffle: bool, generator: torch.Generator | None, device: torch.device
    ) -> Iterator[Batch]:
        for x, y in self.split.batches(batch_size, shuffle=shuffle, generator=generator, device=device):
            if isinstance(x, dict):
                x = {self.task_name: x[self.task_name]}
            yield x, {self.task_name: y[self.task_name]}


def _restrict(split: Split, task_name: str) -> Split:
    if isinstance(split, TensorSplit):
        return TensorSplit(split.inputs, {task_name: split.targets[task_name]})
    return _RestrictedSplit(split, task_name)
