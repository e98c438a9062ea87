"""``backbone=timm`` (docs/own-data.md#any-timm-model): stages at timm's feature points where
they reproduce the model, one pooled stage where not, runs with hard sharing and a
stage-cutting strategy, and the one-line errors (unknown arch, offline pretrained weights,
timm not installed)."""

from __future__ import annotations

import math
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from mtl_runner.preflight import preflight
from mtl_runner.runner import run_experiment
from tests.conftest import compose_config

timm = pytest.importorskip("timm")
from mtl_runner.models import timm_backbone  # noqa: E402  (needs timm for its tests, not to import)

SMALL_RUN = ["dataset.num_train=16", "dataset.num_val=4", "dataset.num_test=4", "dataset.image_size=32", "trainer.epochs=1",
             "trainer.batch_size=8", "trainer.num_threads=1", "trainer.progress=off", "baseline=off", "diagnostics=off", "backbone=timm",
             "backbone.arch=test_resnet"]


@pytest.mark.parametrize(
    ("arch", "channels"),
    [("test_resnet", (32, 32, 48, 192, 96)), ("test_efficientnet", (16, 24, 32, 48, 64)), ("test_convnext", (24, 32, 48, 64))],
)
def test_stages_end_at_timm_feature_points_and_reproduce_its_intermediates(arch: str, channels: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    backbone = timm_backbone.TimmBackbone((3, 32, 32), arch).eval()
    torch.manual_seed(0)  # the same initial weights
    reference = timm.create_model(arch, num_classes=0).eval()
    assert backbone.stage_channels == channels and backbone.output_stride == 32
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = reference.forward_intermediates(x, intermediates_only=True)
        for stage, feature_map in zip(backbone.stages, expected, strict=True):
            x = stage(x)
            torch.testing.assert_close(x, feature_map)
    assert x.dim() == 4  # a feature map: pooling and classifier are not stages


def test_a_model_whose_forward_is_not_its_modules_in_order_is_one_pooled_stage() -> None:
    """A ViT adds position embeddings and a class token outside its blocks: one stage, a vector."""
    backbone = timm_backbone.TimmBackbone((3, 32, 32), "test_vit")
    assert len(backbone.stages) == 1 and backbone.output_stride is None
    assert backbone(torch.zeros(2, 3, 32, 32)).shape == (2, backbone.out_channels)


def test_grey_images_reach_timm_as_its_input_channels() -> None:
    backbone = timm_backbone.TimmBackbone((1, 28, 28), "test_resnet")
    assert backbone(torch.zeros(2, 1, 28, 28)).shape[:2] == (2, backbone.out_channels)


@pytest.mark.slow
def test_hard_sharing_and_mtan_train_on_a_timm_backbone(tmp_path: Path) -> None:
    for sharing in ("hard", "mtan"):  # MTAN attends to every stage: it cuts between them
        results = run_experiment(compose_config([*SMALL_RUN, f"sharing={sharing}"]), tmp_path / sharing)
        assert results["status"] == "completed" and results["steps"] == 2
        assert all(math.isfinite(loss) for loss in results["test_losses"].values())


def _one_line_exit(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        preflight(argv)
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    return err[0]


def test_unknown_arch_and_offline_pretrained_weights_are_one_line_in_the_preflight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert "backbone.arch='resnet9000' is not a timm model" in _one_line_exit(["backbone=timm", "backbone.arch=resnet9000"], capsys)

    def offline(*args: object, **kwargs: object) -> None:  # what huggingface_hub raises without network and cache
        raise OSError("An error happened while trying to locate the file on the Hub and we cannot find the requested files in the local cache.")

    monkeypatch.setattr("timm.models._builder.load_pretrained", offline)
    monkeypatch.setattr(timm_backbone, "_unreachable", lambda timm, arch: None)  # the hub answers; the download fails
    line = _one_line_exit(["backbone=timm", "backbone.arch=test_resnet", "backbone.pretrained=true"], capsys)
    assert line.startswith("mtl-run: error: backbone.pretrained=true: could not fetch test_resnet weights (An error happened")
    assert "run once on a machine with network access" in line and "or use backbone.pretrained=false" in line
    assert not os.listdir(tmp_path)


def test_uncached_weights_with_the_network_out_of_reach_fail_at_once_without_retrying(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """One request with a short timeout, not the Hugging Face client's minute of retries."""
    monkeypatch.chdir(tmp_path)
    asked: list[tuple[str, float]] = []

    def no_network(request: urllib.request.Request, timeout: float) -> None:
        asked.append((request.full_url, timeout))
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    def must_not_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("the weights were fetched although the host is unreachable")

    monkeypatch.setattr(timm_backbone, "_cached", lambda timm, arch: False)
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setattr("timm.models._builder.load_pretrained", must_not_download)
    line = _one_line_exit(["backbone=timm", "backbone.arch=test_resnet", "backbone.pretrained=true"], capsys)
    assert line == ("mtl-run: error: backbone.pretrained=true: test_resnet weights are not cached and huggingface.co cannot be "
                    "reached ([Errno -2] Name or service not known); run once on a machine with network access (timm keeps them "
                    "in the Hugging Face or torch hub cache), or use backbone.pretrained=false")
    assert len(asked) == 1 and asked[0][1] == timm_backbone.PROBE_TIMEOUT_S
    assert not os.listdir(tmp_path)


def test_weights_in_the_torch_hub_cache_count_as_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("huggingface_hub.try_to_load_from_cache", lambda repo_id, filename: None)  # an empty HF cache
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    assert not timm_backbone._cached(timm, "resnet18")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "resnet18_a1_0-d63eafa0.pth").touch()  # the file name of timm's weights URL for resnet18
    assert timm_backbone._cached(timm, "resnet18")


def test_without_timm_installed_the_backbone_says_which_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now raises ImportError
    line = _one_line_exit(["backbone=timm"], capsys)
    assert line.endswith("backbone=timm needs `pip install mtl-runner[timm]` (timm is not installed)")
