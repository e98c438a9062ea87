"""Metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mtl_runner.tasks import IGNORE_INDEX, Task

CPU = torch.device("cpu")


def _logits(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return F.one_hot(labels, num_classes).permute(0, 3, 1, 2).float()


def test_miou_skips_absent_classes_and_ignored_pixels() -> None:
    task = Task("seg", "segmentation", 4)
    target = torch.tensor([[[0, 0, 1, IGNORE_INDEX]]])
    pred = torch.tensor([[[0, 1, 1, 2]]])
    acc = task.accumulator(CPU)
    acc.update(_logits(pred, 4), target)
    out = acc.compute()
    # class 0: tp 1, union 2 -> 0.5; class 1: tp 1, union 2 -> 0.5; classes 2, 3 absent
    assert out["miou"] == pytest.approx(0.5)
    assert out["pix_acc"] == pytest.approx(2 / 3)


def test_depth_errors_over_valid_pixels_only() -> None:
    task = Task("depth", "depth", 1)
    target = torch.tensor([[[[2.0, 4.0, 0.0]]]])
    pred = torch.tensor([[[[3.0, 2.0, 100.0]]]])
    acc = task.accumulator(CPU)
    acc.update(pred, target)
    out = acc.compute()
    assert out["abs_err"] == pytest.approx((1 + 2) / 2)
    assert out["rel_err"] == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert task.loss(pred, target).item() == pytest.approx(1.5)


def test_normal_angle_errors() -> None:
    task = Task("normals", "normals", 3)
    target = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0, 0, 0]]).T.reshape(1, 3, 1, 4)
    angles = [0.0, 20.0, 45.0]
    rad = [math.radians(a) for a in angles]
    pred = torch.tensor(
        [[1.0, 0, 0], [math.sin(rad[1]), math.cos(rad[1]), 0], [0, math.sin(rad[2]), math.cos(rad[2])], [5, 5, 5]]
    ).T.reshape(1, 3, 1, 4)
    acc = task.accumulator(CPU)
    acc.update(pred, target)
    out = acc.compute()
    assert out["mean_angle"] == pytest.approx(sum(angles) / 3, abs=1e-3)
    assert out["median_angle"] == pytest.approx(20.0, abs=0.01)
    assert out["within_11.25"] == pytest.approx(1 / 3)
    assert out["within_22.5"] == pytest.approx(2 / 3)
    assert out["within_30"] == pytest.approx(2 / 3)


def test_accuracy_and_regression() -> None:
    cls = Task("c", "classification", 3)
    acc = cls.accumulator(CPU)
    acc.update(torch.eye(3)[[0, 1, 2, 2]], torch.tensor([0, 1, 1, 2]))
    assert acc.compute()["accuracy"] == pytest.approx(0.75)
    reg = Task("r", "regression", 2)
    acc = reg.accumulator(CPU)
    acc.update(torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 4.0]]))
    # R²'s denominator: the targets' squared deviations from their mean, (0-2)² + (4-2)² = 8
    assert acc.compute() == pytest.approx({"mse": 2.5, "mae": 1.5, "rmse": 2.5**0.5, "r2": 1 - 5 / 8})
