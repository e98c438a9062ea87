"""``sharing=none``: one separate model (encoder and head) per task, nothing shared.

The single-task baseline as a sharing option. Each task's encoder and head are built from
the random state in which a single-task ``sharing=hard`` model of that task would be
built (:func:`~mtl_runner.models.sharing.base.build_columns`), so under one seed, with
the default ``balancer=uniform`` and an optimizer without cross-parameter coupling
(AdamW, SGD), a ``sharing=none`` run trains each column exactly as the single-task
baseline of its task trains.

Shared parameters: none. Gradient surgery and gradient-based balancers have nothing to
act on and are refused when the trainer is built (one-line error); the conflict
diagnostics report that they do not apply.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from mtl_runner.models.sharing.base import BackboneFactory, SharingModel, build_columns
from mtl_runner.tasks import Task


class Separate(SharingModel):
    def __init__(self, backbone: BackboneFactory, tasks: Sequence[Task], input_shape: Sequence[int]) -> None:
        super().__init__(tasks)
        self.encoders, self.heads = build_columns(backbone, tasks, input_shape)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {name: self.forward_task(x, name) for name in self.task_names}

    def forward_task(self, x: Tensor, task: str) -> Tensor:
        return self.heads[task](self.encoders[task](x))

    @property
    def forward_passes_per_input(self) -> int:
        return len(self.task_names)

    def shared_parameters(self) -> list[nn.Parameter]:
        return []

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        return [*self.encoders[task].parameters(), *self.heads[task].parameters()]

    def last_shared_parameters(self) -> list[nn.Parameter]:
        return []
