"""``sharing=film``: one network conditioned on the task (FiLM, Perez et al., AAAI 2018).

A learnable embedding ``e_t`` (``embedding_dim`` numbers) per task; after every backbone
stage ``j`` a generator (a linear map shared by all tasks) turns it into per-channel
scale and shift, and the stage output ``h`` becomes ``(1 + gamma_j(e_t)) * h +
beta_j(e_t)``. The generators start at zero, so training starts from the unmodulated
network (hard sharing with all heads on one representation). Each task's head reads its
own conditioned features: one forward per task (``forward_passes_per_input = T``). The
first stage, which precedes any modulation, runs once; the later stages run once per
task. They are not batched as ``T x B`` examples: batch norm would then pool its
statistics over all tasks' features, and each task's prediction would depend on the other
tasks' embeddings (task-specific parameters reached by another task's loss).

Difference from the paper: FiLM's conditioning is a question encoded by a GRU and its
layers sit inside residual blocks (after batch norm, before the ReLU); here the
condition is the task's learnt embedding, and since backbone stages are opaque the
modulation acts on each stage's output.

Shared parameters: the backbone and the generators (every task's loss reaches them).
Task parameters: the task's embedding and head. ``last_shared_parameters`` (GradNorm's
``W``): the last stage and its generator.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mtl_runner.models.sharing.base import BackboneFactory, SharingModel
from mtl_runner.tasks import Task


class FiLM(SharingModel):
    def __init__(
        self, backbone: BackboneFactory, tasks: Sequence[Task], input_shape: Sequence[int], embedding_dim: int = 16
    ) -> None:
        super().__init__(tasks)
        if embedding_dim < 1:
            raise ValueError(f"sharing.embedding_dim must be >= 1, got {embedding_dim}")
        self.encoder = backbone()
        self.embeddings = nn.ParameterDict({t.name: nn.Parameter(torch.randn(embedding_dim)) for t in tasks})
        self.generators = nn.ModuleList([nn.Linear(embedding_dim, 2 * c) for c in self.encoder.stage_channels])
        for gen in self.generators:
            nn.init.zeros_(gen.weight)
            nn.init.zeros_(gen.bias)
        self.heads = nn.ModuleDict({t.name: self.encoder.make_head(t, input_shape) for t in tasks})

    def _modulate(self, h: Tensor, stage: int, task: str) -> Tensor:
        gamma, beta = self.generators[stage](self.embeddings[task]).to(h.dtype).chunk(2)
        if not self.encoder.is_spatial:  # channels last: vectors (B, C) and token sequences (B, L, C)
            return h * (1 + gamma) + beta
        shape = (1, gamma.shape[0]) + (1,) * (h.dim() - 2)
        return h * (1 + gamma).view(shape) + beta.view(shape)

    def _task_features(self, first: Tensor, task: str) -> Tensor:
        """``task``'s final features from the (unmodulated) first stage's output."""
        h = self._modulate(first, 0, task)
        for j, stage in enumerate(self.encoder.stages[1:], start=1):
            h = self._modulate(stage(h), j, task)
        return h

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        first = self.encoder.stages[0](x)
        return {name: self.heads[name](self._task_features(first, name)) for name in self.task_names}

    def forward_task(self, x: Tensor, task: str) -> Tensor:
        return self.heads[task](self._task_features(self.encoder.stages[0](x), task))

    @property
    def forward_passes_per_input(self) -> int:
        return len(self.task_names)

    def shared_parameters(self) -> list[nn.Parameter]:
        return [*self.encoder.parameters(), *self.generators.parameters()]

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        return [self.embeddings[task], *self.heads[task].parameters()]

    def last_shared_parameters(self) -> list[nn.Parameter]:
        return [*self.encoder.stages[-1].parameters(), *self.generators[-1].parameters()]
