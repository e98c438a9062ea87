"""``sharing=mtan``: Multi-Task Attention Network (Liu, Johns, Davison, CVPR 2019).

One shared encoder; per task and stage ``j`` a soft-attention module over the shared
stage output ``s_j``:

    mask_j^t = g_j^t([s_j, f_j(a_{j-1}^t)])      (for j = 0: g_0^t(s_0))
    a_j^t    = mask_j^t * s_j

``g_j^t`` (task-specific) is 1x1 conv-BN-ReLU then 1x1 conv-BN-sigmoid, as in the
paper's attention layer; ``f_j`` is the paper's shared feature extractor (3x3 conv-BN-
ReLU from stage ``j-1``'s to stage ``j``'s channels, one per stage, shared by all tasks)
followed by max pooling to stage ``j``'s resolution (the paper pools by 2 after each
block; adaptive pooling covers any stage stride). Each task's head reads ``a_J^t``.
Our backbones' stages are opaque, so ``s_j`` (the stage output) plays both roles the
paper gives to the block's first and last layer features. For vector (MLP) backbones the
convolutions are linear layers and there is no pooling (and no batch norm).

Shared parameters: the encoder and the ``f_j`` (every task's loss reaches them).
Task parameters: the attention modules ``g_j^t`` and the heads.
``last_shared_parameters`` (GradNorm's ``W``): the encoder's last stage and ``f_J``.
One encoder pass per input (``forward_passes_per_input = 1``; the attention modules are
small per-task extras).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtl_runner.models.sharing.base import BackboneFactory, SharingModel
from mtl_runner.tasks import Task


def _attention(in_ch: int, ch: int, spatial: bool) -> nn.Module:
    if spatial:
        return nn.Sequential(
            nn.Conv2d(in_ch, ch, 1), nn.BatchNorm2d(ch), nn.ReLU(inplace=True),
            nn.Conv2d(ch, ch, 1), nn.BatchNorm2d(ch), nn.Sigmoid(),
        )
    return nn.Sequential(nn.Linear(in_ch, ch), nn.ReLU(inplace=True), nn.Linear(ch, ch), nn.Sigmoid())


def _extractor(in_ch: int, ch: int, spatial: bool) -> nn.Module:
    if spatial:
        return nn.Sequential(nn.Conv2d(in_ch, ch, 3, padding=1, bias=False), nn.BatchNorm2d(ch), nn.ReLU(inplace=True))
    return nn.Sequential(nn.Linear(in_ch, ch), nn.ReLU(inplace=True))


class MTAN(SharingModel):
    def __init__(self, backbone: BackboneFactory, tasks: Sequence[Task], input_shape: Sequence[int]) -> None:
        super().__init__(tasks)
        self.encoder = backbone()
        channels = self.encoder.stage_channels
        spatial = self.encoder.is_spatial
        self.spatial = spatial
        # f_j for j >= 1 (index j - 1): shared across tasks.
        self.extractors = nn.ModuleList([_extractor(channels[j - 1], channels[j], spatial) for j in range(1, len(channels))])
        self.attention = nn.ModuleDict(
            {
                t.name: nn.ModuleList(
                    [_attention(channels[j] * (1 if j == 0 else 2), channels[j], spatial) for j in range(len(channels))]
                )
                for t in tasks
            }
        )
        self.heads = nn.ModuleDict({t.name: self.encoder.make_head(t, input_shape) for t in tasks})

    def _shared(self, x: Tensor) -> list[Tensor]:
        outs = []
        for stage in self.encoder.stages:
            x = stage(x)
            outs.append(x)
        return outs

    def _task_features(self, shared: list[Tensor], task: str) -> Tensor:
        modules = self.attention[task]
        a: Tensor | None = None
        for j, s in enumerate(shared):
            if a is None:
                mask = modules[j](s)
            else:
                prev = self.extractors[j - 1](a)
                if self.spatial and prev.shape[-2:] != s.shape[-2:]:
                    if prev.shape[-2] >= s.shape[-2] and prev.shape[-1] >= s.shape[-1]:
                        prev = F.adaptive_max_pool2d(prev, s.shape[-2:])
                    else:
                        prev = F.interpolate(prev, size=s.shape[-2:], mode="bilinear", align_corners=False)
                # channels: dim 1 of images, the last dim of vectors and token sequences (B, L, D)
                mask = modules[j](torch.cat([s, prev], dim=1 if self.spatial else -1))
            a = mask * s
        assert a is not None
        return a

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        shared = self._shared(x)
        return {name: self.heads[name](self._task_features(shared, name)) for name in self.task_names}

    def forward_task(self, x: Tensor, task: str) -> Tensor:
        return self.heads[task](self._task_features(self._shared(x), task))

    def shared_parameters(self) -> list[nn.Parameter]:
        return [*self.encoder.parameters(), *self.extractors.parameters()]

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        return [*self.attention[task].parameters(), *self.heads[task].parameters()]

    def last_shared_parameters(self) -> list[nn.Parameter]:
        last = list(self.encoder.stages[-1].parameters())
        if len(self.extractors):
            last += list(self.extractors[-1].parameters())
        return last
