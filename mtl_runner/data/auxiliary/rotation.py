"""``+aux=rotation``: a self-supervised auxiliary task for any image dataset.

The auxiliary task predicts by how much (0, 90, 180 or 270 degrees) a rotated copy of
each input was turned (Gidaris et al., ICLR 2018, as an auxiliary loss). It needs no
labels, so it can be added to any dataset whose inputs are square images; its head is a
global classification head on the shared encoder, and the task is marked
``auxiliary``: trained and logged, excluded from Δm and the headline metrics.

The wrapped dataset is multi-input (``TaskSet.multi_input``): the main tasks read the
original batch, the rotation task its rotated copy. Every main task receives the *same*
tensor object, so a strategy's forward on it runs once for all of them (see
:meth:`SharingModel.predict`); the rotation task costs one more encoder pass per step.

Rotations are drawn on the CPU, a whole epoch's worth before its first batch, from a
generator seeded by a hash of the state of the generator the trainer passes (the run's
seeded data generator). Reading that state does not advance it, so the main tasks see
exactly the batches they would see without ``+aux=rotation`` (a clean with/without
comparison, and single-task baselines built from a wrapped dataset equal the cached
ones), a seed gives the same rotations on every device, and a resumed epoch replays them
exactly. The rotated copy itself is computed on the training device. Validation and test copies use fixed
rotations (from ``seed``), so successive evaluations are comparable.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import replace

import torch
from torch import Tensor

from mtl_runner.data.base import Batch, Split, TaskSet
from mtl_runner.tasks import Task

NUM_ROTATIONS = 4


def rotate(images: Tensor, quarter_turns: Tensor) -> Tensor:
    """Each image of ``(N, C, H, W)`` turned by its ``quarter_turns`` (0-3) times 90
    degrees counter-clockwise; selection by ``torch.where``, so no host sync."""
    out = images
    for k in range(1, NUM_ROTATIONS):
        chosen = (quarter_turns == k).view(-1, *([1] * (images.dim() - 1)))
        out = torch.where(chosen, torch.rot90(images, k, dims=(-2, -1)), out)
    return out


class RotationSplit:
    """A split whose batches add the rotation task: ``inputs`` becomes ``{task: x}`` for
    the main tasks (one shared tensor) and ``{name: rotate(x)}``; ``targets[name]`` are
    the quarter turns. ``fixed_turns`` (one per example) serves unshuffled evaluation."""

    def __init__(self, split: Split, name: str, main_tasks: tuple[str, ...], fixed_turns: Tensor) -> None:
        self.split = split
        self.name = name
        self.main_tasks = main_tasks
        self.fixed_turns = fixed_turns

    def __len__(self) -> int:
        return len(self.split)

    @property
    def nbytes(self) -> int:
        """Present when the wrapped split is held in memory: ``TaskSet.on_device`` then
        moves it to the GPU once, like an unwrapped split."""
        return self.split.nbytes  # type: ignore[attr-defined]

    def to(self, device: torch.device) -> RotationSplit:
        return RotationSplit(self.split.to(device), self.name, self.main_tasks, self.fixed_turns.to(device))  # type: ignore[attr-defined]

    def batches(
        self, batch_size: int, *, shuffle: bool, generator: torch.Generator | None, device: torch.device
    ) -> Iterator[Batch]:
        if shuffle:
            turns = torch.randint(NUM_ROTATIONS, (len(self.split),), generator=_derived(generator))
        else:
            turns = self.fixed_turns
        offset = 0
        for x, y in self.split.batches(batch_size, shuffle=shuffle, generator=generator, device=device):
            assert isinstance(x, Tensor)
            label = turns[offset : offset + len(x)].to(x.device, non_blocking=True)
            offset += len(x)
            inputs = {task: x for task in self.main_tasks}
            inputs[self.name] = rotate(x, label)
            yield inputs, {**y, self.name: label}


def _derived(generator: torch.Generator | None) -> torch.Generator | None:
    """A generator seeded from ``generator``'s current state, leaving that state as it is."""
    if generator is None:
        return None
    digest = hashlib.sha256(generator.get_state().numpy().tobytes()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def rotation(taskset: TaskSet, name: str = "rotation", seed: int = 0) -> TaskSet:
    """``taskset`` with the auxiliary rotation task ``name`` added (see the module doc)."""
    shape = tuple(taskset.input_shape)
    if len(shape) != 3 or shape[1] != shape[2]:
        raise ValueError(
            f"aux=rotation needs square image inputs (C, H, H); dataset={taskset.name} has input shape {shape}"
        )
    if taskset.multi_input:
        raise ValueError(f"aux=rotation needs one input batch shared by all tasks; dataset={taskset.name} gives each task its own")
    if name in taskset.task_names:
        raise ValueError(f"aux.name={name!r} is already a task of dataset={taskset.name}; choose another name")
    gen = torch.Generator().manual_seed(seed)
    main = taskset.task_names

    def wrap(split: Split) -> RotationSplit:
        return RotationSplit(split, name, main, torch.randint(NUM_ROTATIONS, (len(split),), generator=gen))

    task = Task(name, "classification", NUM_ROTATIONS, auxiliary=True, class_names=("0", "90", "180", "270"))
    return replace(
        taskset, tasks=(*taskset.tasks, task), train=wrap(taskset.train), val=wrap(taskset.val),
        test=wrap(taskset.test), multi_input=True,
    )
