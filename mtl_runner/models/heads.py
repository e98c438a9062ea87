"""Task heads, chosen by the task's kind.

Dense tasks (segmentation, depth, normals) get a small conv head on the encoder's last
feature map followed by bilinear up-sampling to the input resolution; image-level tasks
(classification, regression) get global average pooling and an MLP. Heads are always
task-specific parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from mtl_runner.tasks import Task


class DenseHead(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, output_size: tuple[int, int]) -> None:
        super().__init__()
        hidden = max(16, in_channels // 2)
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_channels, 1),
        )
        self.output_size = output_size

    def forward(self, features: Tensor) -> Tensor:
        out = self.body(features)
        if out.shape[-2:] != self.output_size:
            out = F.interpolate(out, size=self.output_size, mode="bilinear", align_corners=False)
        return out


class GlobalHead(nn.Module):
    def __init__(self, in_channels: int, out_features: int, spatial: bool) -> None:
        super().__init__()
        hidden = max(32, in_channels)
        self.pool: nn.Module = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()) if spatial else nn.Identity()
        self.mlp = nn.Sequential(nn.Linear(in_channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_features))

    def forward(self, features: Tensor) -> Tensor:
        return self.mlp(self.pool(features))


def make_head(task: Task, in_channels: int, spatial: bool, input_shape: Sequence[int]) -> nn.Module:
    """The head for ``task`` on features with ``in_channels`` channels (or width)."""
    if task.is_dense:
        if not spatial or len(input_shape) != 3:
            raise ValueError(
                f"task {task.name!r} is dense ({task.kind}) and needs a spatial backbone "
                "(e.g. backbone=small_cnn), not a vector one"
            )
        return DenseHead(in_channels, task.num_outputs, (int(input_shape[1]), int(input_shape[2])))
    return GlobalHead(in_channels, task.num_outputs, spatial)
