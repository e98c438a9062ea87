"""``sharing=hard``: one encoder shared by all tasks, one head per task (the default)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from mtl_runner.models.sharing.base import BackboneFactory, SharingModel
from mtl_runner.tasks import Task


class HardSharing(SharingModel):
    supports_features_space = True

    def __init__(self, backbone: BackboneFactory, tasks: Sequence[Task], input_shape: Sequence[int]) -> None:
        super().__init__(tasks)
        self.encoder = backbone()
        self.heads = nn.ModuleDict({t.name: self.encoder.make_head(t, input_shape) for t in tasks})

    def encode(self, x: Tensor) -> Tensor:
        return self.encoder(x)

    def decode(self, features: Tensor | Mapping[str, Tensor]) -> dict[str, Tensor]:
        if isinstance(features, Mapping):
            return {name: head(features[name]) for name, head in self.heads.items()}
        return {name: head(features) for name, head in self.heads.items()}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.decode(self.encode(x))

    def forward_task(self, x: Tensor, task: str) -> Tensor:
        return self.heads[task](self.encoder(x))

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.encoder.parameters())

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        return list(self.heads[task].parameters())

    def last_shared_parameters(self) -> list[nn.Parameter]:
        return list(self.encoder.stages[-1].parameters())
