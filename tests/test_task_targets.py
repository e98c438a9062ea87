"""A task's own loss and metrics by ``_target_`` (docs/own-data.md#your-own-loss-and-metrics):
torchmetrics classes and plain functions on the labelled entries, their directions through
results.json, Δm and HPARAMS, the one-line errors; and the exact validation loss over
labelled entries when batches hold different numbers of labels."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import Tensor

from mtl_runner import results as results_module
from mtl_runner import task_targets, tasks
from mtl_runner.assemble import build_run
from mtl_runner.data.base import TaskSet, TensorSplit
from mtl_runner.data.image_table import image_table
from mtl_runner.data.table import parse_tasks
from mtl_runner.preflight import preflight
from mtl_runner.runner import run_experiment
from mtl_runner.tasks import IGNORE_INDEX, Task
from mtl_runner.train.distributed import DataParallel
from tests.conftest import compose_config, refusing_host_reads

torchmetrics = pytest.importorskip("torchmetrics")
CPU = torch.device("cpu")


def mean_abs_pct_error(pred: Tensor, target: Tensor) -> Tensor:
    """A user's metric: the batch's mean absolute percentage error (a mean over entries)."""
    return ((pred - target).abs() / target.abs()).mean()


def squared_error(pred: Tensor, target: Tensor, scale: float = 1.0) -> Tensor:
    """A user's loss function with a keyword the YAML binds."""
    return scale * (pred - target).pow(2)


def _regression_task(metrics: dict) -> Task:
    spec = parse_tasks({"y": {"kind": "regression", "metrics": metrics}})[0]
    return Task("y", "regression", 1, **spec.task_arguments)


def test_function_and_torchmetrics_metrics_see_only_labelled_entries_weighted_by_their_count() -> None:
    task = _regression_task({"mae": None, "mape": {"_target_": f"{__name__}.mean_abs_pct_error", "higher_is_better": False},
                             "tm_mae": {"_target_": "torchmetrics.MeanAbsoluteError", "higher_is_better": False}})
    nan = math.nan
    batches = [  # 3, 1 and 0 labelled entries: batch means averaged plainly would be wrong
        (torch.tensor([1.0, 2.0, 3.0, 0.0]), torch.tensor([2.0, 4.0, 1.0, nan])),
        (torch.tensor([5.0, 1.0]), torch.tensor([nan, 10.0])),
        (torch.tensor([7.0]), torch.tensor([nan])),
    ]
    accumulator = task.accumulator(CPU)
    for pred, target in batches:
        accumulator.update(pred.unsqueeze(1), target)
    values = accumulator.compute()
    labelled_pred = np.array([1.0, 2.0, 3.0, 1.0])
    labelled_target = np.array([2.0, 4.0, 1.0, 10.0])
    assert values["mape"] == pytest.approx(np.mean(np.abs(labelled_pred - labelled_target) / labelled_target))
    assert values["tm_mae"] == pytest.approx(np.mean(np.abs(labelled_pred - labelled_target)))
    assert values["tm_mae"] == pytest.approx(values["mae"], rel=1e-6)
    assert [(m.name, m.higher_is_better) for m in task.metrics] == [("mae", False), ("mape", False), ("tm_mae", False)]


def test_own_metrics_are_added_to_the_kind_defaults_and_each_evaluation_starts_fresh() -> None:
    task = _regression_task({"tm_mae": {"_target_": "torchmetrics.MeanAbsoluteError", "higher_is_better": False}})
    assert [m.name for m in task.metrics] == ["mse", "mae", "tm_mae"]
    pred, target = torch.zeros(4, 1), torch.tensor([1.0, 2.0, 3.0, 4.0])
    for _ in range(2):  # a second evaluation does not see the first one's batches
        accumulator = task.accumulator(CPU)
        accumulator.update(pred, target)
        assert accumulator.compute()["tm_mae"] == pytest.approx(2.5)


def test_a_function_metric_that_does_not_reduce_is_an_error_naming_it() -> None:
    task = _regression_task({"diff": {"_target_": "torch.sub", "higher_is_better": False}})
    accumulator = task.accumulator(CPU)
    accumulator.update(torch.zeros(3, 1), torch.ones(3))
    with pytest.raises(ValueError, match=r"metric 'diff': must give one number .*got shape \(3,\)"):
        accumulator.compute()


def test_own_metric_updates_never_read_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    task = _regression_task({"mape": {"_target_": f"{__name__}.mean_abs_pct_error", "higher_is_better": False},
                             "tm_mse": {"_target_": "torchmetrics.MeanSquaredError", "higher_is_better": False}})
    accumulator = task.accumulator(CPU)
    with refusing_host_reads(monkeypatch, "an own metric's update", []):
        for _ in range(3):
            accumulator.update(torch.rand(8, 1), torch.rand(8) + 1.0)
    assert set(accumulator.compute()) >= {"mape", "tm_mse"}


def test_dense_and_class_tasks_give_own_metrics_labelled_pixels_and_rows() -> None:
    """Segmentation: per-pixel class scores of labelled pixels, so micro accuracy is pix_acc."""
    spec = parse_tasks({"seg": {"kind": "segmentation", "metrics": {"tm_acc": {
        "_target_": "torchmetrics.classification.MulticlassAccuracy", "num_classes": 3, "average": "micro",
        "higher_is_better": True}}}}, kinds=("segmentation",))[0]
    task = Task("seg", "segmentation", 3, **spec.task_arguments)
    generator = torch.Generator().manual_seed(0)
    accumulator = task.accumulator(CPU)
    for _ in range(3):
        target = torch.randint(0, 3, (2, 5, 5), generator=generator)
        target[torch.rand(2, 5, 5, generator=generator) < 0.3] = IGNORE_INDEX
        accumulator.update(torch.randn(2, 3, 5, 5, generator=generator), target)
    values = accumulator.compute()
    assert values["tm_acc"] == pytest.approx(values["pix_acc"], rel=1e-6)


def test_image_table_tasks_take_own_metrics_from_yaml(tmp_path: Path) -> None:
    """dataset=image_table parses the same task settings: a torchmetrics metric on a mask
    task (its labelled pixels) and a function on a binary one."""
    rows = []
    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
        mask = np.zeros((8, 8), np.uint8)
        mask[:, 4:] = 1
        mask[0, :] = 255  # unlabelled pixels
        Image.fromarray(mask).save(tmp_path / f"{i}_mask.png")
        rows.append({"path": f"{i}.png", "mask": f"{i}_mask.png", "label": i % 2})
    pd.DataFrame(rows).to_csv(tmp_path / "labels.csv", index=False)
    accuracy = {"_target_": "torchmetrics.classification.MulticlassAccuracy", "num_classes": 2, "average": "micro", "higher_is_better": True}
    taskset = image_table(str(tmp_path), "labels.csv", {
        "seg": {"kind": "segmentation", "column": "mask", "num_classes": 2, "metrics": {"tm_acc": accuracy}},
        "label": {"kind": "binary", "metrics": {"auroc": None, "mape": {"_target_": f"{__name__}.mean_abs_pct_error", "higher_is_better": False}}},
    }, image_size=8, split=(1.0, 0.0, 0.0))
    seg, label = taskset.tasks
    assert [(m.name, m.higher_is_better) for m in seg.metrics] == [("miou", True), ("pix_acc", True), ("tm_acc", True)]
    assert [(m.name, m.higher_is_better) for m in label.metrics] == [("auroc", True), ("mape", False)]
    _, targets = next(taskset.train.batches(4, shuffle=False, generator=None, device=CPU))
    accumulator = seg.accumulator(CPU)
    accumulator.update(torch.randn(4, 2, 8, 8, generator=torch.Generator().manual_seed(0)), targets["seg"])
    values = accumulator.compute()
    assert values["tm_acc"] == pytest.approx(values["pix_acc"], rel=1e-6)


def test_a_function_loss_with_bound_keywords_is_masked_like_the_built_in_losses() -> None:
    spec = parse_tasks({"y": {"kind": "regression", "loss": {"_target_": f"{__name__}.squared_error", "scale": 3.0}}})[0]
    task = Task("y", "regression", 1, **spec.task_arguments)
    pred, target = torch.zeros(4, 1), torch.tensor([math.nan, 2.0, math.nan, 1.0])
    assert task.loss(pred, target).item() == pytest.approx(3.0 * (4.0 + 1.0) / 2)


@pytest.mark.parametrize(
    ("metrics", "message"),
    [
        ("{mape: {_target_: no_such_pkg.mape, higher_is_better: false}}",
         "dataset.tasks.y.metrics.mape._target_: cannot import 'no_such_pkg.mape'"),
        ("{pi: {_target_: math.pi, higher_is_better: true}}", "dataset.tasks.y.metrics.pi._target_: math.pi is a float, not a class or a function"),
        ("{mape: {_target_: tests.test_task_targets.mean_abs_pct_error}}", "dataset.tasks.y.metrics.mape.higher_is_better is required: true or false"),
        ("{mse: {_target_: torchmetrics.MeanSquaredError, higher_is_better: false}}",
         "dataset.tasks.y.metrics.mse: is the name of a built-in metric of this kind"),
        ("[mse, mape]", "dataset.tasks.y.metrics: unknown metric 'mape'; built-in: mse, mae, rmse, r2"),
        ("{tm: {_target_: torchmetrics.MeanSquaredError, no_such_key: 1, higher_is_better: false}}",
         "dataset.tasks.y.metrics.tm: torchmetrics.MeanSquaredError(no_such_key) failed"),
    ],
)
def test_bad_own_metrics_are_one_line_in_the_preflight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], metrics: str, message: str
) -> None:
    pd.DataFrame({"x": np.arange(10.0), "y": np.arange(10.0) + 1}).to_csv(tmp_path / "t.csv", index=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        preflight(["dataset=table", f"dataset.path={tmp_path / 't.csv'}", f"dataset.tasks={{y: {{kind: regression, metrics: {metrics}}}}}",
                   "backbone=mlp"])
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and message in err[0], err
    assert os.listdir(tmp_path) == ["t.csv"]


def test_a_task_built_in_code_refuses_an_own_metric_named_like_a_built_in() -> None:
    clash = task_targets.UserMetric("accuracy", True, mean_abs_pct_error)
    with pytest.raises(ValueError, match="metric 'accuracy' of its own has the name of a built-in classification metric"):
        _ = Task("c", "classification", 3, user_metrics=(clash,)).metrics


def _unequal_labels_taskset() -> TaskSet:
    """Validation batches of 4 rows hold 4, 1 and 2 labelled regression targets and
    3, 0 and 2 labelled classes."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(10, 3, generator=generator)
    y = torch.tensor([1.0, 2.0, -1.0, 0.5, math.nan, math.nan, 3.0, math.nan, 2.0, math.nan])
    c = torch.tensor([0, 1, IGNORE_INDEX, 2, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 1, 0])
    split = TensorSplit(x, {"y": y, "c": c})
    return TaskSet("unequal", (Task("y", "regression", 1), Task("c", "classification", 3)), split, split, split, (3,))


def test_the_validation_loss_is_the_exact_mean_over_labelled_entries() -> None:
    taskset = _unequal_labels_taskset()
    cfg = compose_config(["backbone=mlp", "backbone.hidden=[8]", "trainer.progress=off", "baseline=off", "diagnostics=off",
                          "trainer.eval_batch_size=4"])
    run = build_run(cfg, None, taskset=taskset, diagnostics=False)
    losses = run.trainer.evaluate(taskset.val).losses
    run.model.eval()
    with torch.no_grad():
        outputs = run.model.predict(taskset.val.inputs)
    y, c = taskset.val.targets["y"], taskset.val.targets["c"]
    squared = (outputs["y"].reshape(-1) - y).pow(2)[~y.isnan()].double()
    cross_entropy = torch.nn.functional.cross_entropy(outputs["c"], c, ignore_index=IGNORE_INDEX, reduction="none")[c != IGNORE_INDEX].double()
    assert losses["y"] == pytest.approx(float(squared.mean()), rel=1e-6)
    assert losses["c"] == pytest.approx(float(cross_entropy.mean()), rel=1e-6)
    # the mean of batch means weighted by rows (the former rule) is measurably different here
    per_batch = [float(squared[:4].mean()), float(squared[4:5].mean()), float(squared[5:].mean())]
    assert abs(losses["y"] - float(np.average(per_batch, weights=[4, 4, 2]))) > 1e-3


@pytest.mark.slow
def test_own_metric_directions_reach_results_delta_m_and_hparams(tmp_path: Path) -> None:
    """dataset=table end to end with baselines: the function metric (lower is better) and a
    torchmetrics one (higher is better) in results.json and results.md, with deltas signed
    by their direction and Δm over every metric."""
    generator = np.random.default_rng(0)
    x = generator.normal(size=(120, 4))
    frame = pd.DataFrame(x, columns=[f"x{i}" for i in range(4)])
    frame["spend"] = 5.0 + x[:, 0] + 0.1 * generator.normal(size=120)
    frame.loc[::4, "spend"] = np.nan
    frame["churn"] = (x[:, 1] > 0).astype(int)
    frame.to_csv(tmp_path / "t.csv", index=False)
    tasks = ("dataset.tasks={spend: {kind: regression, loss: {_target_: torch.nn.HuberLoss, reduction: none, delta: 2.0},"
             f" metrics: {{mae: null, mape: {{_target_: {__name__}.mean_abs_pct_error, higher_is_better: false}}}}}},"
             " churn: {kind: binary, metrics: {tm_acc: {_target_: torchmetrics.classification.BinaryAccuracy, higher_is_better: true}}}}")
    cfg = compose_config(["dataset=table", f"dataset.path={tmp_path / 't.csv'}", tasks, "backbone=mlp", "backbone.hidden=[16]",
                          "baseline=on", f"baseline.root={tmp_path / 'baselines'}", "trainer.progress=off", "trainer.epochs=2",
                          "trainer.batch_size=32", "diagnostics=off"])
    out = run_experiment(cfg, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    spend, churn = saved["tasks"]["spend"]["metrics"], saved["tasks"]["churn"]["metrics"]
    assert set(spend) == {"mae", "mape"} and set(churn) == {"accuracy", "auroc", "f1", "tm_acc"}
    assert spend["mape"]["higher_is_better"] is False and churn["tm_acc"]["higher_is_better"] is True
    assert churn["tm_acc"]["mtl"] == pytest.approx(churn["accuracy"]["mtl"], abs=1e-6)
    for metric in (spend["mape"], churn["tm_acc"]):
        sign = 1.0 if metric["higher_is_better"] else -1.0
        assert metric["delta_pct"] == pytest.approx(sign * 100.0 * (metric["mtl"] - metric["stl"]) / metric["stl"], rel=1e-6)
    deltas = [m["delta_pct"] for task in saved["tasks"].values() for m in task["metrics"].values()]
    assert saved["delta_m_pct"] == pytest.approx(float(np.mean(deltas)), rel=1e-6)
    # what mtl-report reads per task
    assert saved["tasks"]["spend"]["delta_pct_mean"] == pytest.approx(np.mean([m["delta_pct"] for m in spend.values()]), rel=1e-6)
    assert "| spend | mape | ↓ |" in (tmp_path / "run" / "results.md").read_text()
    assert "hparam/test/spend/mape" in results_module.final_metrics(out)
    assert saved["val"]["delta_pct"]["spend"]["mape"] is not None and "tm_acc" in saved["val"]["metrics"]["churn"]


CALLS: list[int] = []


def counted_error_rate(pred: Tensor, target: Tensor) -> Tensor:
    """A user's metric that records how many entries each call saw."""
    CALLS.append(len(target))
    return (pred.argmax(-1) != target).float().mean()


@pytest.mark.parametrize("pending_bytes", [None, 1], ids=["one selection", "one per batch"])
def test_own_metrics_select_labelled_entries_of_several_batches_at_once(
        monkeypatch: pytest.MonkeyPatch, pending_bytes: int | None) -> None:
    """Token tagging with sequences of different lengths per batch: the own metric sees the
    labelled tokens of all batches in one selection (the host sync a selection costs is paid
    once per evaluation here), or of each batch when the budget is tiny; same value."""
    if pending_bytes is not None:
        monkeypatch.setattr(tasks, "PENDING_BYTES", pending_bytes)
    spec = parse_tasks({"pos": {"kind": "classification", "metrics": {"err": {
        "_target_": f"{__name__}.counted_error_rate", "higher_is_better": False}}}})[0]
    task = Task("pos", "tagging", 4, **spec.task_arguments)
    generator = torch.Generator().manual_seed(0)
    accumulator, labelled = task.accumulator(CPU), []
    CALLS.clear()
    for length in (3, 7, 5):
        scores, target = torch.randn(2, length, 4, generator=generator), torch.randint(0, 4, (2, length), generator=generator)
        target[:, -1] = IGNORE_INDEX  # padding
        accumulator.update(scores, target)
        labelled.append((scores[target != IGNORE_INDEX], target[target != IGNORE_INDEX]))
    # under ddp the ranks sum the accumulators' statistics before compute(): they settle first
    statistics = DataParallel.statistics([accumulator])
    assert not accumulator.pending and float(statistics[-1][1]) == sum(len(t) for _, t in labelled)
    value = accumulator.compute()["err"]
    scores, target = (torch.cat(parts) for parts in zip(*labelled))
    assert value == pytest.approx(float((scores.argmax(-1) != target).float().mean()))
    assert CALLS == ([len(target)] if pending_bytes is None else [4, 12, 8])
