"""The encoders of the MTL benchmarks: torchvision ResNets, the dilated ResNet-50 with
DeepLab ASPP heads, MGDA's LeNet and MTAN's SegNet, each a :class:`Backbone` with stages.

Every class exposes its network as ordered ``stages`` so the sharing strategies (hard,
cross-stitch, MTAN, FiLM, ...) can act between them, and builds the head its benchmark
pairs it with where that differs from the generic heads (``make_head``).
"""

from __future__ import annotations

from collections.abc import Sequence
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision import models
from torchvision.models.segmentation.deeplabv3 import DeepLabHead

from mtl_runner.data.roots import root_check
from mtl_runner.models.backbones import Backbone
from mtl_runner.models.torchvision_backbone import pretrained_state
from mtl_runner.tasks import Task

RESNETS = {"resnet18": models.resnet18, "resnet34": models.resnet34, "resnet50": models.resnet50}


def _image_input(name: str, input_shape: Sequence[int]) -> int:
    if len(input_shape) != 3:
        raise ValueError(f"backbone={name} needs image inputs (C, H, W), got input shape {tuple(input_shape)}")
    return int(input_shape[0])


def check_weights(arch: str = "resnet50", weights: str | None = None, **_: object) -> None:
    """Preflight: pretrained weights are in the torch hub cache, or can be fetched now."""
    if weights is not None and arch in RESNETS:
        pretrained_state(arch, weights)


@root_check(check_weights)
class ResNet(Backbone):
    """``backbone=resnet18|resnet34|resnet50``: torchvision's ResNet without its classifier.

    Stages: the stem (conv, BN, ReLU, max-pool) and ``layer1``..``layer4``; output stride
    32 (``dilation`` trades the strides of ``layer3``/``layer4`` for dilated convolutions).
    Inputs with other than 3 channels get a fresh first convolution; with pretrained
    weights it starts from the RGB filters' mean, repeated per channel."""

    def __init__(
        self,
        input_shape: Sequence[int],
        arch: str = "resnet50",
        weights: str | None = None,
        dilation: Sequence[bool] = (False, False, False),
    ) -> None:
        super().__init__()
        if arch not in RESNETS:
            raise ValueError(f"backbone.arch={arch!r}; allowed: {', '.join(RESNETS)}")
        in_channels = _image_input(arch, input_shape)
        if len(dilation) != 3:
            raise ValueError(f"backbone.dilation must list 3 booleans (layer2..layer4), got {list(dilation)}")
        net = RESNETS[arch](weights=None, replace_stride_with_dilation=list(dilation))
        if weights is not None:
            net.load_state_dict(pretrained_state(arch, weights))
        if in_channels != 3:
            rgb = net.conv1.weight.detach()
            net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
            if weights is not None:
                with torch.no_grad():
                    net.conv1.weight.copy_(rgb.mean(1, keepdim=True).expand(-1, in_channels, -1, -1))
        self.stages = nn.ModuleList(
            [nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool), net.layer1, net.layer2, net.layer3, net.layer4]
        )
        expansion = 4 if arch == "resnet50" else 1
        self.stage_channels = (64, 64 * expansion, 128 * expansion, 256 * expansion, 512 * expansion)
        self.output_stride = 32 // (2 ** sum(bool(d) for d in dilation))


class ASPPHead(nn.Module):
    """DeepLab-v3's head (ASPP with rates 12/24/36 and image pooling, 3x3 conv, 1x1
    classifier), up-sampled bilinearly to the input resolution: the dense-task decoder
    of the NYUv2/Cityscapes protocol of LibMTL.

    The image-pooling branch normalises one value per channel and sample, so a training
    batch of a single sample (the last batch of an epoch can be one) has no batch
    statistics: that branch then normalises with its running statistics instead."""

    def __init__(self, in_channels: int, out_channels: int, output_size: tuple[int, int]) -> None:
        super().__init__()
        self.body = DeepLabHead(in_channels, out_channels)
        self.output_size = output_size
        pooling = self.body[0].convs[-1]  # ASPPPooling: avg-pool, conv 1x1, BN, ReLU
        self.pooling_norm: nn.BatchNorm2d = next(m for m in pooling.modules() if isinstance(m, nn.BatchNorm2d))

    def forward(self, features: Tensor) -> Tensor:
        if self.training and features.shape[0] == 1:
            self.pooling_norm.eval()
            try:
                out = self.body(features)
            finally:
                self.pooling_norm.train()
        else:
            out = self.body(features)
        return F.interpolate(out, size=self.output_size, mode="bilinear", align_corners=False)


@root_check(check_weights)
class ResNetDilated(ResNet):
    """``backbone=resnet50_dilated``: ResNet-50 with ``layer3``/``layer4`` dilated (output
    stride 8) and an ASPP head per dense task; image-level tasks get the generic head."""

    def __init__(self, input_shape: Sequence[int], arch: str = "resnet50", weights: str | None = None) -> None:
        super().__init__(input_shape, arch=arch, weights=weights, dilation=(False, True, True))

    def make_head(self, task: Task, input_shape: Sequence[int]) -> nn.Module:
        if task.is_dense:
            return ASPPHead(self.out_channels, task.num_outputs, (int(input_shape[1]), int(input_shape[2])))
        return super().make_head(task, input_shape)


class LeNet(Backbone):
    """``backbone=lenet``: the shared encoder of MGDA's MultiMNIST model (Sener & Koltun
    2018): conv 5x5 (10) - max-pool - ReLU, conv 5x5 (20) - dropout - max-pool - ReLU,
    then a 50-unit fully connected layer with ReLU. Its heads are theirs too: 50-unit
    layer, ReLU, dropout, linear classifier.

    The fully connected layer is written as a convolution whose kernel covers the whole
    feature map (the same map, output 1x1), so every stage is spatial and strategies that
    treat stages as feature maps (MTAN's attention) apply to all three alike."""

    def __init__(self, input_shape: Sequence[int], hidden: int = 50, dropout: float = 0.5) -> None:
        super().__init__()
        in_channels = _image_input("lenet", input_shape)
        side = [(int(s) - 4) // 2 for s in input_shape[1:]]
        side = [(s - 4) // 2 for s in side]
        if min(side) < 1:
            raise ValueError(f"backbone=lenet needs images of at least 16x16, got {tuple(input_shape[1:])}")
        self.dropout = dropout
        self.stages = nn.ModuleList(
            [
                nn.Sequential(nn.Conv2d(in_channels, 10, 5), nn.MaxPool2d(2), nn.ReLU()),
                nn.Sequential(nn.Conv2d(10, 20, 5), nn.Dropout2d(dropout), nn.MaxPool2d(2), nn.ReLU()),
                nn.Sequential(nn.Conv2d(20, hidden, (side[0], side[1])), nn.ReLU()),
            ]
        )
        self.stage_channels = (10, 20, hidden)
        self.output_stride = int(input_shape[1])  # the last stage is 1x1

    def make_head(self, task: Task, input_shape: Sequence[int]) -> nn.Module:
        if task.is_dense:
            raise ValueError(f"task {task.name!r} is dense ({task.kind}); backbone=lenet ends in a 1x1 map, use a dense backbone (segnet, resnet50_dilated)")
        width = self.out_channels
        return nn.Sequential(
            nn.Flatten(), nn.Linear(width, width), nn.ReLU(), nn.Dropout(self.dropout), nn.Linear(width, task.num_outputs)
        )


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class _PoolIndices:
    """Where SegNet's encoder stages leave their max-pooling indices for the decoder
    stage that un-pools at the same scale. Stages stay a plain sequence of modules (what
    sharing strategies iterate over) while the decoder still un-pools with the encoder's
    indices, as SegNet does. A plain object, so it holds no parameters or buffers."""

    def __init__(self) -> None:
        self.by_level: dict[int, tuple[Tensor, torch.Size]] = {}


class _SegNetDown(nn.Module):
    def __init__(self, layers: nn.Sequential, level: int, memory: _PoolIndices) -> None:
        super().__init__()
        self.layers = layers
        self.level = level
        self.memory = memory

    def forward(self, x: Tensor) -> Tensor:
        features = self.layers(x)
        pooled, indices = F.max_pool2d(features, 2, 2, return_indices=True)
        self.memory.by_level[self.level] = (indices, features.shape)
        return pooled


class _SegNetUp(nn.Module):
    def __init__(self, layers: nn.Sequential, level: int, memory: _PoolIndices) -> None:
        super().__init__()
        self.layers = layers
        self.level = level
        self.memory = memory

    def forward(self, x: Tensor) -> Tensor:
        indices, shape = self.memory.by_level[self.level]
        return self.layers(F.max_unpool2d(x, indices, 2, 2, output_size=shape[-2:]))


class SegNet(Backbone):
    """``backbone=segnet``: the SegNet of MTAN (Liu et al. 2019), VGG-16-like.

    Five encoder levels with ``width * (1, 2, 4, 8, 8)`` channels (1, 1, 2, 2, 2 extra
    conv-BN-ReLU layers after the first) each ending in a 2x2 max-pool, and five decoder
    levels that max-unpool with the encoder's indices and mirror the convolutions; the
    output has ``width`` channels at full resolution (output stride 1). MTAN's dense
    heads: conv 3x3 then conv 1x1. ``width=64`` is the paper's network (about 25M
    parameters); smaller widths are for tests. Image sides must be multiples of 32."""

    def __init__(self, input_shape: Sequence[int], width: int = 64) -> None:
        super().__init__()
        in_channels = _image_input("segnet", input_shape)
        if width < 1:
            raise ValueError(f"backbone.width must be >= 1, got {width}")
        if any(int(s) % 32 for s in input_shape[1:]):
            raise ValueError(f"backbone=segnet needs image sides that are multiples of 32, got {tuple(input_shape[1:])}")
        filters = [width, 2 * width, 4 * width, 8 * width, 8 * width]
        extra = [1, 1, 2, 2, 2]
        memory = _PoolIndices()
        down: list[nn.Module] = []
        previous = in_channels
        for level, (channels, repeats) in enumerate(zip(filters, extra)):
            layers = [_conv_bn_relu(previous, channels)] + [_conv_bn_relu(channels, channels) for _ in range(repeats)]
            down.append(_SegNetDown(nn.Sequential(*layers), level, memory))
            previous = channels
        up: list[nn.Module] = []
        for level in reversed(range(5)):
            channels, target = filters[level], filters[max(level - 1, 0)]
            layers = [_conv_bn_relu(channels, target)] + [_conv_bn_relu(target, target) for _ in range(extra[level])]
            up.append(_SegNetUp(nn.Sequential(*layers), level, memory))
        self.stages = nn.ModuleList(down + up)
        self.stage_channels = tuple(filters) + tuple(filters[max(level - 1, 0)] for level in reversed(range(5)))
        self.output_stride = 1

    def make_head(self, task: Task, input_shape: Sequence[int]) -> nn.Module:
        if task.is_dense:
            width = self.out_channels
            return nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.Conv2d(width, task.num_outputs, 1))
        return super().make_head(task, input_shape)

