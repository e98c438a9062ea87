"""Benchmark backbones: stage output shapes (what sharing strategies hook between), the
benchmark heads, and pretrained weights failing clearly without network access."""

from __future__ import annotations

import urllib.error

import pytest
import torch
from torch import nn

from mtl_runner.config import ConfigError
from mtl_runner.models.resnets import ASPPHead, LeNet, ResNet, ResNetDilated, SegNet
from mtl_runner.tasks import Task
from tests.conftest import compose_config

SEG = Task("seg", "segmentation", 13)
DIGIT = Task("left", "classification", 10)


def _stage_shapes(backbone: nn.Module, x: torch.Tensor) -> list[tuple[int, ...]]:
    shapes = []
    for stage in backbone.stages:
        x = stage(x)
        shapes.append(tuple(x.shape))
    return shapes


@torch.no_grad()
def test_resnet18_stages_at_32x32() -> None:
    net = ResNet((3, 32, 32), arch="resnet18").eval()
    shapes = _stage_shapes(net, torch.randn(2, 3, 32, 32))
    assert shapes == [(2, 64, 8, 8), (2, 64, 8, 8), (2, 128, 4, 4), (2, 256, 2, 2), (2, 512, 1, 1)]
    assert net.stage_channels == tuple(s[1] for s in shapes) and net.output_stride == 32
    assert sum(p.numel() for p in net.parameters()) == 11_176_512  # torchvision's resnet18 without fc


@torch.no_grad()
@pytest.mark.slow
def test_resnet50_channels_and_one_channel_input() -> None:
    net = ResNet((1, 32, 32), arch="resnet50").eval()
    shapes = _stage_shapes(net, torch.randn(1, 1, 32, 32))
    assert [s[1] for s in shapes] == [64, 256, 512, 1024, 2048] == list(net.stage_channels)


@torch.no_grad()
@pytest.mark.slow
def test_resnet50_dilated_has_output_stride_8_and_aspp_dense_heads() -> None:
    net = ResNetDilated((3, 32, 32)).eval()
    shapes = _stage_shapes(net, torch.randn(2, 3, 32, 32))
    assert shapes[-1] == (2, 2048, 4, 4) and net.output_stride == 8
    head = net.make_head(SEG, (3, 32, 32))
    assert isinstance(head, ASPPHead)
    assert head.eval()(torch.randn(2, 2048, 4, 4)).shape == (2, 13, 32, 32)
    assert not isinstance(net.make_head(DIGIT, (3, 32, 32)), ASPPHead)
    head.train()  # a last training batch of one sample: the pooling branch has no batch statistics
    with torch.enable_grad():
        head(torch.randn(1, 2048, 4, 4)).sum().backward()
    assert head.training and head.pooling_norm.training


@torch.no_grad()
def test_lenet_matches_mgda_multimnist_shapes() -> None:
    net = LeNet((1, 28, 28)).eval()
    assert _stage_shapes(net, torch.randn(3, 1, 28, 28)) == [(3, 10, 12, 12), (3, 20, 4, 4), (3, 50, 1, 1)]
    assert net.make_head(DIGIT, (1, 28, 28)).eval()(torch.randn(3, 50, 1, 1)).shape == (3, 10)
    assert sum(p.numel() for p in net.parameters()) == 260 + 5020 + 16050  # MGDA's conv1, conv2, fc(320 -> 50)
    with pytest.raises(ValueError, match="at least 16x16"):
        LeNet((1, 12, 12))


@torch.no_grad()
def test_segnet_decoder_unpools_back_to_full_resolution() -> None:
    net = SegNet((3, 32, 32), width=2).eval()
    shapes = _stage_shapes(net, torch.randn(2, 3, 32, 32))
    assert [s[-1] for s in shapes] == [16, 8, 4, 2, 1, 2, 4, 8, 16, 32]
    assert [s[1] for s in shapes] == list(net.stage_channels) and shapes[-1] == (2, 2, 32, 32)
    assert net.make_head(SEG, (3, 32, 32))(torch.randn(2, 2, 32, 32)).shape == (2, 13, 32, 32)
    # the paper's width: MTAN's SegNet is about 25M parameters
    assert 24_000_000 < sum(p.numel() for p in SegNet((3, 32, 32)).parameters()) < 26_000_000
    with pytest.raises(ValueError, match="multiples of 32"):
        SegNet((3, 40, 32), width=2)


def test_unpooling_uses_the_encoders_max_positions() -> None:
    net = SegNet((1, 32, 32), width=1).eval()
    x = torch.zeros(1, 1, 32, 32)
    x[0, 0, 5, 7] = 1.0
    down = net.stages[0]
    pooled = down(x)
    indices, _ = down.memory.by_level[0]
    assert pooled.shape == (1, 1, 16, 16) and indices.shape == (1, 1, 16, 16)
    features = down.layers(x)
    assert int(indices.flatten()[int(torch.argmax(pooled.flatten()))]) == int(torch.argmax(features.flatten()))


def test_pretrained_weights_without_network_is_one_clear_line(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mtl_runner.build import build_model, build_taskset

    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache
    # what torchvision's weight enums call (offline whether or not this machine has network)
    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", offline)
    cfg = compose_config(["backbone=resnet18", "backbone.weights=IMAGENET1K_V1", "dataset.num_train=8",
                          "dataset.num_val=4", "dataset.num_test=4", "dataset.image_size=32"])
    with pytest.raises(ConfigError) as info:
        build_model(cfg, build_taskset(cfg))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("backbone.weights=IMAGENET1K_V1: could not fetch resnet18")
    assert "network access" in message and str(tmp_path) in message and "backbone.weights=null" in message


def test_pretrained_weights_without_network_fail_in_preflight(
    tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from mtl_runner.cli import preflight

    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", offline)
    with pytest.raises(SystemExit) as exit_info:
        preflight(["backbone=resnet50_dilated", "backbone.weights=IMAGENET1K_V1"])
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "backbone.weights=IMAGENET1K_V1: could not fetch resnet50" in lines[0], lines


def test_unknown_weights_name_lists_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match="backbone.weights='IMAGENET9K'.*allowed: null, IMAGENET1K_V1"):
        ResNet((3, 32, 32), arch="resnet50", weights="IMAGENET9K")


@pytest.mark.parametrize(("backbone", "sharing"), [("lenet", "mtan"), ("lenet", "cross_stitch"), ("segnet", "cross_stitch"), ("segnet", "mtan")])
def test_stages_serve_soft_sharing_strategies(backbone: str, sharing: str) -> None:
    """MTAN attends to every stage's feature map; cross-stitch runs one column per task
    stage by stage (each SegNet column un-pools with its own encoder's indices)."""
    from mtl_runner.build import build_model, build_taskset

    extra = ["backbone.width=2"] if backbone == "segnet" else []
    cfg = compose_config([f"backbone={backbone}", f"sharing={sharing}", *extra, "dataset.num_train=4",
                          "dataset.num_val=2", "dataset.num_test=2", "dataset.image_size=32"])
    taskset = build_taskset(cfg)
    if backbone == "lenet":  # image-level tasks only: keep the scenes' count task
        taskset = taskset.only("count")
    model = build_model(cfg, taskset).eval()
    x, _ = next(taskset.train.batches(2, shuffle=False, generator=None, device=torch.device("cpu")))
    with torch.no_grad():
        out = model(x)
    expected = {"seg": (2, 5, 32, 32), "depth": (2, 1, 32, 32), "count": (2, 4)}
    assert {k: tuple(v.shape) for k, v in out.items()} == {k: expected[k] for k in taskset.task_names}
