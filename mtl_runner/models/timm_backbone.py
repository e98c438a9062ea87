"""``backbone=timm``: any timm model by name, without its classifier, as a
:class:`~mtl_runner.models.backbones.Backbone` with stages (docs/own-data.md#any-timm-model).

timm is an optional extra (``pip install mtl-runner[timm]``); this module imports it only
when a timm backbone is asked for, so a missing install is one line, not a traceback.

Stages come from timm's own feature points (``feature_info``: the modules after which a
model's ``features_only`` form reads a feature map). The model's top-level modules (a
``Sequential`` opened one level, as timm's feature extractor does) are cut after each
feature point, and the modules past the last one (pooling, head, classifier) are dropped.
That cut is kept only where it reproduces the model: each stage's output must equal timm's
own ``forward_intermediates`` on a test image. Where it does not (ViTs, whose forward adds
position embeddings outside those modules) or a model has no feature points, the backbone
is one stage: the model up to its pooled features (``pre_logits``), a vector (dense tasks
refuse it; strategies that act between stages act at its output only).

``pretrained: true`` loads timm's default pretrained weights for ``arch`` (a tag picks
others: ``resnet18.a1_in1k``), from the Hugging Face / torch hub cache or the network;
the preflight fetches them, or fails in one line (in seconds when the network is out of
reach, instead of the minute the Hugging Face client spends retrying). The input's channel count is passed to
timm (``in_chans``), so grey images work too.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from collections.abc import Sequence
from types import ModuleType
from typing import Any
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

from mtl_runner.data.roots import root_check
from mtl_runner.errors import ConfigError
from mtl_runner.models.backbones import Backbone
from mtl_runner.models.torchvision_backbone import measure_stages

#: Seconds the weights' host has to answer before it counts as unreachable.
PROBE_TIMEOUT_S = 5.0
SUGGESTED = ("resnet18", "resnet10t", "efficientnet_b0", "mobilenetv3_small_100", "convnext_atto", "vit_tiny_patch16_224")


def _timm() -> ModuleType:
    try:
        import timm
    except ImportError:
        raise ConfigError("backbone=timm needs `pip install mtl-runner[timm]` (timm is not installed)") from None
    return timm


def _check_arch(timm: ModuleType, arch: str) -> None:
    if not timm.is_model(arch):
        raise ValueError(f"backbone.arch={arch!r} is not a timm model; e.g. {', '.join(SUGGESTED)} (timm.list_models() lists them)")


def _cached(timm: ModuleType, arch: str) -> bool:
    """Whether ``arch``'s pretrained weights are in the Hugging Face or torch hub cache."""
    cfg = timm.models.get_pretrained_cfg(arch)
    if cfg is None:
        return False
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        names = [name for name in (cfg.hf_hub_filename, "model.safetensors", "pytorch_model.bin") if name]
        if any(isinstance(try_to_load_from_cache(cfg.hf_hub_id, name), str) for name in names):
            return True
    if cfg.url:
        return os.path.exists(os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(cfg.url).path)))
    return False


def _unreachable(timm: ModuleType, arch: str) -> str | None:
    """Why the host of ``arch``'s weights cannot be reached now; ``None`` when it answers.
    Why ask first: without a network the Hugging Face client retries five times with
    back-off, about a minute, before it fails; one request with a short timeout (through
    the same proxy settings) says the same in seconds."""
    from huggingface_hub import constants

    cfg = timm.models.get_pretrained_cfg(arch)
    if cfg is None:
        return None
    if cfg.hf_hub_id and constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = constants.ENDPOINT if cfg.hf_hub_id else cfg.url
    if not url:
        return None
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return None  # it answered, if only with an error status
    except OSError as exc:  # URLError, timeouts, refused connections
        return f"{urlparse(url).netloc} cannot be reached ({getattr(exc, 'reason', exc)})"
    return None


def create(arch: str, pretrained: bool, in_chans: int = 3) -> nn.Module:
    """timm's model without its classifier; pretrained weights that cannot be fetched are
    one line that says what to do (within seconds when the network is unreachable)."""
    timm = _timm()
    _check_arch(timm, arch)
    if pretrained and not _cached(timm, arch) and (unreachable := _unreachable(timm, arch)):
        raise ValueError(
            f"backbone.pretrained=true: {arch} weights are not cached and {unreachable}; run once on a machine with "
            "network access (timm keeps them in the Hugging Face or torch hub cache), or use backbone.pretrained=false"
        )
    try:
        return timm.create_model(arch, pretrained=pretrained, num_classes=0, in_chans=in_chans)
    except Exception as exc:
        if not pretrained:
            raise
        # huggingface_hub / urllib errors, timeouts, proxies: one line instead of a traceback
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(
            f"backbone.pretrained=true: could not fetch {arch} weights ({reason}); run once on a machine with network access "
            "(timm keeps them in the Hugging Face or torch hub cache), or use backbone.pretrained=false"
        ) from None


def check_timm(arch: str = "resnet18", pretrained: bool = False, **_: object) -> None:
    """Preflight: timm installed, a known architecture, and its pretrained weights cached or fetchable now."""
    timm = _timm()
    _check_arch(timm, arch)
    if pretrained:
        create(arch, pretrained=True)


def _top_level_modules(model: nn.Module, points: Sequence[str]) -> list[tuple[str, nn.Module]]:
    """The model's children in order, a ``Sequential`` child opened one level (``blocks.0``)
    unless it is itself a feature point (``layer1``)."""
    modules = []
    for name, child in model.named_children():
        if isinstance(child, nn.Sequential) and name not in points:
            modules.extend((f"{name}.{sub}", grandchild) for sub, grandchild in child.named_children())
        else:
            modules.append((name, child))
    return modules


def _cut_at_feature_points(model: nn.Module) -> list[nn.Module] | None:
    """Stages that end at each of timm's feature points, or None where the points are not
    among the top-level modules."""
    points = [str(info["module"]) for info in getattr(model, "feature_info", None) or []]
    if not points:
        return None
    stages, current = [], []
    remaining = list(points)
    for name, module in _top_level_modules(model, points):
        current.append(module)
        if remaining and name == remaining[0]:
            stages.append(nn.Sequential(*current))
            current, remaining = [], remaining[1:]
        if not remaining:
            return stages
    return None


@torch.no_grad()
def _reproduces_the_model(model: nn.Module, stages: list[nn.Module], input_shape: tuple[int, ...]) -> bool:
    """Whether the stages' outputs are timm's intermediates on a test image (eval mode)."""
    forward_intermediates = getattr(model, "forward_intermediates", None)
    if forward_intermediates is None:
        return False
    was_training = model.training
    model.eval()
    try:
        x = torch.randn(1, *input_shape, generator=torch.Generator().manual_seed(0))
        expected = forward_intermediates(x, intermediates_only=True)
        if len(expected) != len(stages):
            return False
        for stage, reference in zip(stages, expected):
            x = stage(x)
            if x.shape != reference.shape or not torch.allclose(x, reference, rtol=1e-4, atol=1e-5):
                return False
        return True
    except (RuntimeError, AssertionError, NotImplementedError, TypeError, ValueError):
        return False
    finally:
        model.train(was_training)


class _PooledFeatures(nn.Module):
    """The whole model up to what its classifier reads (``pre_logits``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Any:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)


@root_check(check_timm)
class TimmBackbone(Backbone):
    """``backbone=timm backbone.arch=<name>``: see the module docstring."""

    def __init__(self, input_shape: Sequence[int], arch: str = "resnet18", pretrained: bool = False) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"backbone=timm needs image inputs (C, H, W), got input shape {tuple(input_shape)}")
        shape = tuple(int(s) for s in input_shape)
        model = create(arch, pretrained, in_chans=shape[0])
        stages = _cut_at_feature_points(model)
        if stages is None or not _reproduces_the_model(model, stages, shape):
            stages = [_PooledFeatures(model)]
        self.stages = nn.ModuleList(stages)
        self.stage_channels, self.output_stride = measure_stages(self, arch, shape)  # type: ignore[arg-type]
