"""``sharing=film``: one network conditioned on the task (FiLM, Perez et al., AAAI 2018).

A learnable embedding ``e_t`` (``embedding_dim`` numbers) per task; after every backbone
stage ``j`` a generator (a linear map shared by all tasks) turns it into per-channel
scale and shift, and the stage output ``h`` becomes ``(1 + gamma_j(e_t)) * h +
beta_j(e_t)``. The generators start at zero, so training starts from the unmodulated
network (hard sharing with all heads on one representation). Each task's head reads its
own conditioned features: one forward per task (``forward_passes_per_input = T``). The
``T`` forwards run as one batch of ``T x B`` examples; the first stage, which precedes
any modulation, runs once.

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

    def _conditioned(self, x: Tensor, tasks: Sequence[str]) -> Tensor:
        """Each listed task's final features, stacked ``(len(tasks), B, ...)``."""
        emb = torch.stack([self.embeddings[t] for t in tasks])  # (T', d)
        k = len(tasks)
        h = self.encoder.stages[0](x)
        batch = h.shape[0]
        h = h.unsqueeze(0).expand(k, *h.shape).reshape(k * batch, *h.shape[1:])
        for j, stage in enumerate(self.encoder.stages):
            if j > 0:
                h = stage(h)
            gamma, beta = self.generators[j](emb).to(h.dtype).chunk(2, dim=-1)  # (T', C)
            shape = (k, 1, gamma.shape[-1]) + (1,) * (h.dim() - 2)
            h = h.reshape(k, batch, *h.shape[1:]) * (1 + gamma).view(shape) + beta.view(shape)
            h = h.reshape(k * batch, *h.shape[2:])
        return h.reshape(k, batch, *h.shape[1:])

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        features = self._conditioned(x, self.task_names)
        return {name: self.heads[name](features[i]) for i, name in enumerate(self.task_names)}

    def forward_task(self, x: Tensor, task: str) -> Tensor:
        return self.heads[task](self._conditioned(x, [task])[0])

    @property
    def forward_passes_per_input(self) -> int:
        return len(self.task_names)

    def shared_parameters(self) -> list[nn.Parameter]:
        return [*self.encoder.parameters(), *self.generators.parameters()]

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        return [self.embeddings[task], *self.heads[task].parameters()]

    def last_shared_parameters(self) -> list[nn.Parameter]:
        return [*self.encoder.stages[-1].parameters(), *self.generators[-1].parameters()]
