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

from mtl_runner.models.heads import make_head
from mtl_runner.tasks import Task


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

    def make_head(self, task: Task, input_shape: Sequence[int]) -> nn.Module:
        """The head for ``task`` on this backbone's features (a backbone whose output is
        already the prediction, like ``linear``, overrides this)."""
        return make_head(task, self.out_channels, self.is_spatial, input_shape)


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


class Linear(Backbone):
    """``backbone=linear``: one linear map ``x -> W x`` (no bias by default, no
    non-linearity), for linear multi-task regression (``dataset=linear_tasks``).

    Its output is the prediction itself: a task with ``out_features`` outputs gets an
    identity head (no parameters), any other (non-dense) task a bias-free linear map, so
    every sharing strategy stays a linear model. With one output per task, task ``t``'s
    model is ``y = x . beta_t`` with ``beta_t`` the encoder's weight: ``sharing=hard`` is
    the pooled fit, ``sharing=none`` independent least squares and ``sharing=soft`` the
    Evgeniou & Pontil (2004) estimator (see :mod:`mtl_runner.models.sharing.soft`).
    """

    def __init__(self, input_shape: Sequence[int], out_features: int = 1, bias: bool = False) -> None:
        super().__init__()
        if out_features < 1:
            raise ValueError(f"backbone.out_features must be >= 1, got {out_features}")
        in_dim = 1
        for s in input_shape:
            in_dim *= s
        self.stages = nn.ModuleList([nn.Sequential(nn.Flatten(), nn.Linear(in_dim, out_features, bias=bias))])
        self.stage_channels = (out_features,)
        self.output_stride = None

    def make_head(self, task: Task, input_shape: Sequence[int]) -> nn.Module:
        if task.is_dense:
            raise ValueError(f"task {task.name!r} is dense ({task.kind}); backbone=linear predicts vectors only")
        if task.num_outputs == self.out_channels:
            return nn.Identity()
        return nn.Linear(self.out_channels, task.num_outputs, bias=False)
