"""Common interface of sharing strategies (architectures).

A strategy is an ``nn.Module`` whose ``forward(x)`` returns ``{task: prediction}`` and
which partitions its parameters into shared ones (``shared_parameters()``, the ones
gradient surgery and conflict diagnostics act on) and each task's own
(``task_parameters(task)``). Strategies with a single shared representation also split
their forward into ``encode`` and ``decode`` so the engine can work in the features
space (MGDA-UB style).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn

from mtl_runner.models.backbones import Backbone
from mtl_runner.tasks import Task

BackboneFactory = Callable[[], Backbone]


class SharingModel(nn.Module):
    #: True when encode/decode exist (one shared representation feeds every head).
    supports_features_space: bool = False

    def __init__(self, tasks: Sequence[Task]) -> None:
        super().__init__()
        self.tasks = tuple(tasks)
        self.task_names = tuple(t.name for t in tasks)

    def shared_parameters(self) -> list[nn.Parameter]:
        raise NotImplementedError

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        raise NotImplementedError

    def last_shared_parameters(self) -> list[nn.Parameter]:
        """The last shared layer's parameters (GradNorm's ``W``)."""
        raise NotImplementedError

    def encode(self, x: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no single shared representation")

    def decode(self, features: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError(f"{type(self).__name__} has no single shared representation")

    @property
    def forward_passes_per_input(self) -> int:
        """How many encoder passes one input costs at inference (1 for hard sharing)."""
        return 1

    def penalty(self) -> Tensor | None:
        """An extra loss term of the architecture itself (soft sharing's coupling)."""
        return None

    def diagnostics(self) -> dict[str, Tensor]:
        """Scalars worth logging (cross-stitch units, gate usage), as tensors."""
        return {}
