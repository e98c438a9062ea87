"""``backbone=torchvision``: any torchvision classification model by name, without its
classifier, as a :class:`~mtl_runner.models.backbones.Backbone` with stages.

Stages follow each family's own blocks, so sharing strategies that act between stages
(cross-stitch, MTAN, FiLM, learning_to_branch) cut where the architecture has a natural
boundary:

* ResNet, ResNeXt, Wide ResNet: the stem, then ``layer1`` .. ``layer4``;
* RegNet: the stem, then the trunk's four blocks;
* every model whose body is a ``features`` sequence (EfficientNet, MobileNet, ConvNeXt,
  VGG, DenseNet, MNASNet, ShuffleNet's ``stage`` layout excepted): one stage per element;
* ViT: one stage (patch embedding, class token and encoder, read at the class token), so
  the output is a vector, and strategies that act between stages (cross-stitch, MTAN, FiLM,
  learning_to_branch) act at that output only.

Other families (Inception, GoogLeNet, Swin, MaxViT, ShuffleNet, SqueezeNet) raise a
one-line error naming the supported ones. Each stage's width and the output stride are
measured with one forward pass of a zero image of the run's input shape. ``weights`` is
torchvision's enum member name (``IMAGENET1K_V1``, ``DEFAULT``); the weights come from
the torch hub cache (or are fetched), checked in the preflight.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision import models

from mtl_runner.data.roots import root_check
from mtl_runner.models.backbones import Backbone


def pretrained_state(arch: str, weights: str) -> dict[str, Tensor]:
    """torchvision's weights ``weights`` of ``arch``; without network access (and nothing in
    the torch hub cache) a one-line error that says what to do."""
    enum = models.get_model_weights(arch)
    allowed = [*(w.name for w in enum), "DEFAULT"]
    if weights not in allowed:
        raise ValueError(f"backbone.weights={weights!r} is not available for {arch}; allowed: null, {', '.join(allowed)}")
    entry = enum[weights] if weights != "DEFAULT" else enum.DEFAULT  # type: ignore[attr-defined]
    try:
        return entry.get_state_dict(progress=False)
    except Exception as exc:  # URLError, timeouts, proxies: one line instead of a traceback
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        cache = f"{torch.hub.get_dir()}/checkpoints/{entry.url.rsplit('/', 1)[-1]}"
        raise ValueError(
            f"backbone.weights={weights}: could not fetch {arch} weights from {entry.url} ({reason}); "
            f"run once on a machine with network access (or copy the file to the torch hub cache, {cache}), "
            "or use backbone.weights=null"
        ) from None


def _check_arch(arch: str) -> None:
    try:
        models.get_model_builder(arch)  # a dictionary lookup in torchvision's model registry
    except ValueError:
        raise ValueError(f"backbone.arch={arch!r} is not a torchvision classification model; e.g. {', '.join(SUGGESTED)}") from None


def check_weights(arch: str = "resnet18", weights: str | None = None, **_: object) -> None:
    """Preflight: a known architecture, and its pretrained weights cached or fetchable now."""
    _check_arch(arch)
    if weights is not None:
        pretrained_state(arch, weights)


SUGGESTED = ("resnet50", "efficientnet_b0", "convnext_tiny", "mobilenet_v3_small", "regnet_y_400mf", "vit_b_16")


class _ViTEncoder(nn.Module):
    """A torchvision ViT up to its class token: what its classifier head reads."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.vit._process_input(x)
        cls = self.vit.class_token.expand(tokens.shape[0], -1, -1)
        return self.vit.encoder(torch.cat([cls, tokens], dim=1))[:, 0]


def _stages(arch: str, net: nn.Module) -> list[nn.Module]:
    if hasattr(net, "layer4"):  # ResNet family
        stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        return [stem, net.layer1, net.layer2, net.layer3, net.layer4]
    if hasattr(net, "trunk_output"):  # RegNet
        return [net.stem, *net.trunk_output.children()]
    if hasattr(net, "class_token") and hasattr(net, "encoder"):  # ViT
        return [_ViTEncoder(net)]
    features = getattr(net, "features", None)
    if isinstance(features, nn.Sequential) and not arch.startswith(("swin", "maxvit", "squeezenet")):
        stages = list(features.children())
        if arch.startswith("densenet"):  # DenseNet applies its last ReLU outside ``features``
            stages[-1] = nn.Sequential(stages[-1], nn.ReLU())
        return stages
    raise ValueError(
        f"backbone.arch={arch}: its stages cannot be derived here; supported families: ResNet/ResNeXt/Wide ResNet, "
        "RegNet, EfficientNet, MobileNet, ConvNeXt, VGG, DenseNet, MNASNet, ViT"
    )


@torch.no_grad()
def measure_stages(backbone: Backbone, arch: str, input_shape: tuple[int, int, int]) -> tuple[tuple[int, ...], int | None]:
    """Each stage's output width and the last one's stride, from one forward pass of a zero
    image in eval mode (the training-mode state is restored); an input the architecture
    cannot take is one line naming ``backbone.arch``."""
    was_training = backbone.training
    backbone.eval()
    x = torch.zeros(1, *input_shape)
    widths = []
    try:
        for stage in backbone.stages:
            x = stage(x)
            widths.append(int(x.shape[1]))
    except (RuntimeError, AssertionError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"backbone.arch={arch} does not accept inputs of shape {input_shape} ({reason}); change dataset.image_size") from None
    finally:
        backbone.train(was_training)
    stride = input_shape[1] // int(x.shape[-1]) if x.dim() == 4 else None
    return tuple(widths), stride


@root_check(check_weights)
class TorchvisionBackbone(Backbone):
    """``backbone=torchvision backbone.arch=<name>``: see the module docstring."""

    def __init__(self, input_shape: Sequence[int], arch: str = "resnet18", weights: str | None = None) -> None:
        super().__init__()
        if len(input_shape) != 3 or int(input_shape[0]) != 3:
            raise ValueError(f"backbone=torchvision needs RGB image inputs (3, H, W), got input shape {tuple(input_shape)}")
        _check_arch(arch)
        net = models.get_model(arch, weights=None)
        if weights is not None:
            net.load_state_dict(pretrained_state(arch, weights))
        self.stages = nn.ModuleList(_stages(arch, net))
        self.stage_channels, self.output_stride = measure_stages(self, arch, tuple(int(s) for s in input_shape))
