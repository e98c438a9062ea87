"""A split for multi-input datasets: every task has its own inputs and targets.

Classic multi-task regression (Evgeniou & Pontil; the CS330 setting) gives each task its
own sample ``(X_t, y_t)``; there is no shared input on which all tasks are labelled. Each
training step therefore draws one mini-batch *per task* and the model runs each task's
head on that task's inputs. :class:`MultiInputSplit` yields batches in the multi-input
format of ``data/base.py``: ``(inputs, targets)``, both dicts task -> tensor, with
``inputs[t]`` and ``targets[t]`` of the same length.

Tasks with different sample counts. An epoch is as many steps as the *largest* task
needs, ``ceil(max_t n_t / batch_size)``; at every step every task contributes a batch of
the same size (``batch_size``, the last step of an epoch the remainder ``max_t n_t mod
batch_size``). Each task reads its samples from its own stream: a shuffled order of its
``n_t`` indices, followed by a fresh shuffled order when it runs out, and so on. So in
one epoch the largest task sees each of its samples exactly once and a smaller task sees
each of its samples at least once (some twice, as it wraps around), which keeps every
task in every step and the per-step losses comparable. When a task has fewer samples
than ``batch_size`` its batch wraps within itself and repeats samples.

Without shuffling (evaluation) the order is ``0 .. n_t - 1`` repeated; with equal sizes
per task, as every built-in multi-input dataset has, each sample then counts exactly
once in an evaluation. With unequal evaluation sizes the smaller tasks' first samples
count more than once: give evaluation splits equal sizes per task.

Determinism: all permutations of an epoch are drawn from the given generator at the start
of :meth:`MultiInputSplit.batches`, tasks in insertion order, on the CPU, so a seed gives
the same batches on every device and a resumed epoch replays exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import Tensor

from mtl_runner.data.base import Batch


class MultiInputSplit:
    """Per-task tensors ``{task: (inputs_t (n_t, ...), targets_t (n_t, ...))}``.

    ``transform``, when given, maps each input batch once it is on the training device:
    image datasets keep their pixels as uint8 (a quarter of the memory of floats) and
    convert and normalise a batch at a time where it is cheap."""

    def __init__(self, data: Mapping[str, tuple[Tensor, Tensor]], transform: Callable[[Tensor], Tensor] | None = None) -> None:
        if not data:
            raise ValueError("MultiInputSplit needs at least one task")
        for task, (x, y) in data.items():
            if len(x) != len(y):
                raise ValueError(f"task {task!r}: inputs and targets disagree in length: {len(x)} vs {len(y)}")
            if len(x) == 0:
                raise ValueError(f"task {task!r} has no samples")
        self.data: dict[str, tuple[Tensor, Tensor]] = dict(data)
        self.transform = transform

    @property
    def sizes(self) -> dict[str, int]:
        """Samples per task."""
        return {task: len(x) for task, (x, _) in self.data.items()}

    def __len__(self) -> int:
        """Samples per epoch of the largest task: the epoch length (see the module docstring)."""
        return max(self.sizes.values())

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes + y.nbytes for x, y in self.data.values())

    def to(self, device: torch.device) -> MultiInputSplit:
        return MultiInputSplit({t: (x.to(device), y.to(device)) for t, (x, y) in self.data.items()}, self.transform)

    def steps(self, batch_size: int) -> int:
        """Steps (batches per task) in one epoch."""
        return math.ceil(len(self) / batch_size)

    def _orders(self, shuffle: bool, generator: torch.Generator | None) -> dict[str, Tensor]:
        """Each task's index stream for one epoch, ``len(self)`` long, on the CPU."""
        total = len(self)
        orders = {}
        for task, n in self.sizes.items():
            cycles = math.ceil(total / n)
            if not shuffle:
                stream = torch.arange(n).repeat(cycles)
            elif cycles == 1:
                stream = torch.randperm(n, generator=generator)
            else:  # one fresh permutation per pass, drawn in one call
                stream = torch.rand(cycles, n, generator=generator).argsort(dim=1).flatten()
            orders[task] = stream[:total]
        return orders

    def batches(
        self, batch_size: int, *, shuffle: bool, generator: torch.Generator | None, device: torch.device
    ) -> Iterator[Batch]:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        orders = self._orders(shuffle, generator)
        for task, (x, _) in self.data.items():
            if x.device.type != "cpu":
                orders[task] = orders[task].to(x.device)
        total = len(self)
        for start in range(0, total, batch_size):
            inputs: dict[str, Tensor] = {}
            targets: dict[str, Tensor] = {}
            for task, (x, y) in self.data.items():
                idx = orders[task][start : start + batch_size]
                xb, yb = x.index_select(0, idx), y.index_select(0, idx)
                if device.type == "cuda" and x.device.type == "cpu":
                    xb, yb = xb.pin_memory(), yb.pin_memory()
                xb = xb.to(device, non_blocking=True)
                inputs[task] = self.transform(xb) if self.transform is not None else xb
                targets[task] = yb.to(device, non_blocking=True)
            yield inputs, targets
