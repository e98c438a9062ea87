"""Encoders that expose ordered stages.

Every backbone is an ``nn.Module`` whose ``stages`` (an ``nn.ModuleList``) run in order;
``forward`` is their composition. Exposing the stages is what lets soft-sharing
strategies (cross-stitch, MTAN, FiLM) act between them. ``stage_channels`` gives each
stage's output channels (spatial backbones) or width (vector backbones),
``output_stride`` the spatial down-sampling of the last stage (``None`` for vectors).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


class Backbone(nn.Module):
    stages: nn.ModuleList
    stage_channels: tuple[int, ...]
    output_stride: int | None

    @property
    def is_spatial(self) -> bool:
        return self.output_stride is not None

    @property
    def out_channels(self) -> int:
        return self.stage_channels[-1]

    def forward(self, x: Tensor) -> Tensor:
        for stage in self.stages:
            x = stage(x)
        return x


class SmallCNN(Backbone):
    """Conv-BN-ReLU stages: small enough to train on a CPU in a minute, deep enough that
    dense and global tasks compete for its features."""

    def __init__(
        self,
        input_shape: Sequence[int],
        channels: Sequence[int] = (32, 64, 96, 96),
        strides: Sequence[int] = (1, 2, 2, 1),
    ) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"backbone=small_cnn needs image inputs (C, H, W), got input shape {tuple(input_shape)}")
        if len(channels) != len(strides) or not channels:
            raise ValueError("backbone.channels and backbone.strides must be non-empty and of equal length")
        stages, in_ch, stride_total = [], input_shape[0], 1
        for out_ch, stride in zip(channels, strides):
            stages.append(
                nn.Sequential(
                    nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False),
                    nn.BatchNorm2d(out_ch),
                    nn.ReLU(inplace=True),
                )
            )
            in_ch, stride_total = out_ch, stride_total * stride
        self.stages = nn.ModuleList(stages)
        self.stage_channels = tuple(channels)
        self.output_stride = stride_total


class MLP(Backbone):
    """Linear-ReLU stages for vector inputs (flattens anything else)."""

    def __init__(self, input_shape: Sequence[int], hidden: Sequence[int] = (256, 256), dropout: float = 0.0) -> None:
        super().__init__()
        if not hidden:
            raise ValueError("backbone.hidden must list at least one layer width")
        in_dim = 1
        for s in input_shape:
            in_dim *= s
        stages: list[nn.Module] = []
        for i, width in enumerate(hidden):
            layers: list[nn.Module] = [nn.Flatten()] if i == 0 else []
            layers += [nn.Linear(in_dim, width), nn.ReLU(inplace=True)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            stages.append(nn.Sequential(*layers))
            in_dim = width
        self.stages = nn.ModuleList(stages)
        self.stage_channels = tuple(hidden)
        self.output_stride = None
