"""Your own data from YAML (docs/own-data.md): tables and image folders read from files the
tests write from scikit-learn's bundled real datasets, task kinds, missing labels, the data
summary, torchvision backbones, and the one-line errors for bad input."""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits, load_wine
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from mtl_runner.assemble import build_run
from mtl_runner.data.base import TaskSet, TensorSplit
from mtl_runner.data.image_table import image_table
from mtl_runner.data.roots import check_dataset
from mtl_runner.data.table import table
from mtl_runner.errors import ConfigError
from mtl_runner.preflight import preflight
from mtl_runner.runner import run_experiment
from mtl_runner.tasks import IGNORE_INDEX, Task
from tests.conftest import compose_config

CPU = torch.device("cpu")
WINE_TASKS = (
    "dataset.tasks={cultivar: {kind: classification, column: target}, strong: {kind: binary},"
    " color_intensity: {kind: regression, metrics: [mae, rmse, r2]}, shape: {kind: multilabel, columns: [flav_high, hue_high]}}"
)
DIGIT_TASKS = "dataset.tasks={digit: {kind: classification}, odd: {kind: binary}, shape: {kind: multilabel, columns: [small, round, prime]}}"
QUICK = ["trainer.progress=off", "trainer.batch_size=32", "trainer.epochs=2"]


def write_wine(directory: Path, suffix: str = ".csv") -> Path:
    """Wine (178 real samples, 13 measurements): the cultivar, and targets derived from three
    measurements that are then removed from the inputs; a third of the colour intensities
    are missing."""
    frame = load_wine(as_frame=True).frame
    for column, task in (("alcohol", "strong"), ("flavanoids", "flav_high"), ("hue", "hue_high")):
        frame[task] = (frame[column] > frame[column].median()).astype(int)
    frame = frame.drop(columns=["alcohol", "flavanoids", "hue"])
    frame.loc[::3, "color_intensity"] = np.nan
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"wine{suffix}"
    frame.to_parquet(path) if suffix == ".parquet" else frame.to_csv(path, index=False)
    return path


def write_digits(root: Path, count: int = 240) -> Path:
    """The 8x8 digits as PNGs and a CSV: digit class, parity, and a multilabel set."""
    digits = load_digits()
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (pixels, digit) in enumerate(zip(digits.images[:count], digits.target[:count])):
        name = f"img/{i:04d}.png"
        Image.fromarray((pixels * 255 / 16).astype(np.uint8)).save(root / name)
        rows.append({"path": name, "digit": int(digit), "odd": int(digit % 2), "small": int(digit < 5),
                     "round": int(digit in (0, 6, 8, 9)), "prime": int(digit in (2, 3, 5, 7))})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return root / "labels.csv"


@pytest.mark.slow
def test_wine_table_end_to_end_with_baselines(tmp_path: Path) -> None:
    path = write_wine(tmp_path / "data", ".parquet")
    cfg = compose_config(["dataset=table", f"dataset.path={path}", WINE_TASKS, "backbone=mlp", "backbone.hidden=[32,32]",
                          "baseline=on", f"baseline.root={tmp_path / 'baselines'}", *QUICK])
    results = run_experiment(cfg, tmp_path / "run")
    assert results["status"] == "completed" and math.isfinite(results["delta_m_pct"])
    assert {t: set(v["metrics"]) for t, v in results["tasks"].items()} == {
        "cultivar": {"accuracy"}, "strong": {"accuracy", "auroc", "f1"},
        "color_intensity": {"mae", "rmse", "r2"}, "shape": {"map", "macro_f1"},
    }
    summary = json.loads((tmp_path / "run" / "data_summary.json").read_text())
    assert summary["splits"] == {"train": 142, "val": 18, "test": 18}
    assert 0.5 < summary["tasks"]["color_intensity"]["train"]["coverage"] < 0.8
    assert sum(summary["tasks"]["cultivar"]["train"]["classes"].values()) == 142
    assert set(summary["preprocessing"]["inputs"]["numeric"]) == set(load_wine().feature_names) - {"alcohol", "flavanoids", "hue", "color_intensity"}


@pytest.mark.slow
def test_digit_images_end_to_end_with_baselines(tmp_path: Path) -> None:
    write_digits(tmp_path / "digits")
    cfg = compose_config(["dataset=image_table", f"dataset.root={tmp_path / 'digits'}", "dataset.labels=labels.csv",
                          DIGIT_TASKS, "dataset.image_size=16", "backbone=small_cnn", "backbone.channels=[8,8,16,16]",
                          "baseline=on", f"baseline.root={tmp_path / 'baselines'}", *QUICK])
    results = run_experiment(cfg, tmp_path / "run")
    assert results["status"] == "completed" and math.isfinite(results["delta_m_pct"])
    assert set(results["tasks"]) == {"digit", "odd", "shape"}
    summary = json.loads((tmp_path / "run" / "data_summary.json").read_text())
    assert summary["splits"] == {"train": 192, "val": 24, "test": 24}
    assert set(summary["tasks"]["shape"]["train"]["positive_rate"]) == {"small", "round", "prime"}


def _train(taskset: TaskSet, epochs: int = 3) -> tuple[list[float], dict[str, float]]:
    cfg = compose_config(["backbone=mlp", "backbone.hidden=[16]", "trainer.progress=off", "baseline=off",
                          f"trainer.epochs={epochs}", "trainer.batch_size=1000", "trainer.eval_batch_size=7", "diagnostics=off"])
    run = build_run(cfg, None, taskset=taskset, diagnostics=False)
    run.trainer.fit()
    history = [record["train_loss"]["y"] for record in run.trainer.state.history]
    return history, run.trainer.evaluate(taskset.test).metrics["y"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["regression", "classification", "binary"])
def test_half_missing_labels_train_like_the_labelled_subset(kind: str) -> None:
    """One task, half of its labels missing (full-batch steps, so each step's loss is the
    mean over the whole split): the same training losses and test metrics as training on
    the labelled rows alone; the metrics are taken on a test split that is half unlabelled,
    in batches of 7 that hold different numbers of labels."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g)
    score = x @ torch.tensor([1.0, -2.0, 0.5, 0.0, 1.0])
    target = {"regression": score, "classification": (score > 0).long() + (score > 1).long(),
              "binary": (score > 0).float()}[kind]
    task = Task("y", kind, 3 if kind == "classification" else 1)
    labelled = torch.arange(200) % 2 == 0
    missing = torch.where(labelled, target, IGNORE_INDEX if kind == "classification" else float("nan"))
    partial = TaskSet("partial", (task,), TensorSplit(x[:100], {"y": missing[:100]}), TensorSplit(x[100:150], {"y": missing[100:150]}),
                      TensorSplit(x[150:], {"y": missing[150:]}), (5,))
    keep = labelled.clone()
    subset = TaskSet("subset", (task,), *(TensorSplit(x[a:b][keep[a:b]], {"y": target[a:b][keep[a:b]]})
                                         for a, b in ((0, 100), (100, 150), (150, 200))), (5,))
    history_partial, metrics_partial = _train(partial)
    history_subset, metrics_subset = _train(subset)
    assert history_partial == pytest.approx(history_subset, rel=1e-5)
    assert metrics_partial == pytest.approx(metrics_subset, rel=1e-5)


@pytest.mark.parametrize("kind, target", [
    ("classification", torch.full((4,), IGNORE_INDEX)), ("binary", torch.full((4,), math.nan)),
    ("multilabel", torch.full((4, 3), math.nan)), ("regression", torch.full((4,), math.nan)),
])
def test_a_batch_without_labels_contributes_zero(kind: str, target: torch.Tensor) -> None:
    outputs = {"classification": 3, "binary": 1, "multilabel": 3, "regression": 1}[kind]
    task = Task("t", kind, outputs)  # type: ignore[arg-type]
    pred = torch.randn(4, outputs, requires_grad=True)
    loss = task.loss(pred, target)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(pred.grad, torch.zeros_like(pred))


def test_binary_and_multilabel_metrics_agree_with_scikit_learn() -> None:
    g = torch.Generator().manual_seed(1)
    y = (torch.rand(3000, 4, generator=g) < 0.35).float()
    logits = torch.randn(3000, 4, generator=g) + 1.2 * y
    y_missing = y.clone()
    y_missing[::4, 1] = math.nan
    binary = Task("b", "binary", 1).accumulator(CPU)
    multilabel = Task("m", "multilabel", 4).accumulator(CPU)
    for chunk in range(3):  # several batches, as in an evaluation
        rows = slice(chunk * 1000, (chunk + 1) * 1000)
        binary.update(logits[rows, :1], y[rows, 0])
        multilabel.update(logits[rows], y_missing[rows])
    got = binary.compute()
    assert got["auroc"] == pytest.approx(roc_auc_score(y[:, 0], logits[:, 0]), abs=1e-3)
    assert got["f1"] == pytest.approx(f1_score(y[:, 0], logits[:, 0] > 0))
    assert got["accuracy"] == pytest.approx(float(((logits[:, 0] > 0).float() == y[:, 0]).float().mean()))
    labelled = [~y_missing[:, j].isnan() for j in range(4)]
    want_map = np.mean([average_precision_score(y[m, j], logits[m, j]) for j, m in enumerate(labelled)])
    want_f1 = np.mean([f1_score(y[m, j], logits[m, j] > 0) for j, m in enumerate(labelled)])
    assert multilabel.compute() == pytest.approx({"map": want_map, "macro_f1": want_f1}, abs=1e-3)


def test_table_inputs_splits_and_labels(tmp_path: Path) -> None:
    frame = pd.DataFrame({
        "num": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], "colour": ["red", "blue", "red", "green", "blue", "red"],
        "part": ["train", "train", "train", "val", "test", "test"], "label": ["b", "a", "b", None, "a", "b"],
        "flag": [True, False, True, False, True, False], "other": [9, 9, 9, 9, 9, 9],
    })
    path = tmp_path / "t.csv"
    frame.to_csv(path, index=False)
    taskset = table(str(path), {"kind_of": {"kind": "classification", "column": "label"}, "flag": {"kind": "binary"}},
                    input_columns=["n*", "colour"], categorical_columns=["colour"], split_column="part")
    assert (len(taskset.train), len(taskset.val), len(taskset.test)) == (3, 1, 2)
    assert taskset.input_shape == (3,)  # num, and colour one-hot over the training split's red / blue
    train = taskset.train.inputs
    assert train[:, 0].mean().item() == pytest.approx(0.0, abs=1e-6)
    assert taskset.preprocessing["inputs"]["categorical"] == {"colour": ["blue", "red"]}
    assert taskset.test.inputs[:, 1:].tolist() == [[1.0, 0.0], [0.0, 1.0]]
    assert taskset.val.targets["kind_of"].tolist() == [IGNORE_INDEX]
    assert taskset.tasks[0].class_names == ("a", "b")


@pytest.mark.parametrize("change, tasks, fragments", [
    (lambda f: f.drop(columns=["spend"]), None, ["column 'spend'", "not in the file"]),
    (lambda f: f.assign(city=["x"] * len(f)), None, ["input column 'city' is not numeric", "categorical_columns"]),
    (lambda f: f.assign(seg=[3] * len(f)), {"seg": {"kind": "classification"}}, ["column 'seg'", "at least two classes"]),
    (lambda f: f.assign(seg=[0, 1, 7] + [1] * (len(f) - 3)), {"seg": {"kind": "classification", "num_classes": 3}},
     ["column 'seg' row 3", "out of range", "0..2"]),
    (lambda f: f.assign(x1=[0.0, math.inf] + [1.0] * (len(f) - 2)), None, ["column 'x1' row 2", "finite"]),
    (lambda f: f, {"spend": {"kind": "regression"}, "again": {"kind": "binary", "column": "spend"}},
     ["column 'spend' is already the target of task 'spend'"]),
])
def test_bad_tables_fail_in_the_preflight_naming_file_column_and_row(tmp_path: Path, change, tasks, fragments) -> None:
    frame = pd.DataFrame({"x1": np.arange(10.0), "churn": [0, 1] * 5, "spend": np.linspace(0, 1, 10)})
    path = tmp_path / "data.csv"
    change(frame).to_csv(path, index=False)
    tasks = tasks or {"churn": {"kind": "binary"}, "spend": {"kind": "regression"}}
    with pytest.raises(ConfigError) as error:
        check_dataset({"_target_": "mtl_runner.data.table.table", "path": str(path), "tasks": tasks})
    for fragment in [str(path) if "already" not in fragments[0] else "dataset.tasks.again", *fragments]:
        assert fragment in str(error.value), str(error.value)
    assert "\n" not in str(error.value)


def test_missing_table_from_the_command_line_is_one_line_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        preflight(["dataset=table", "dataset.path=/no/such.csv", "dataset.tasks={y: {kind: binary}}", "backbone=mlp"])
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "dataset.path=/no/such.csv: no such file" in err[0]
    assert not os.listdir(tmp_path)


def test_image_table_preflight_names_missing_and_undecodable_images(tmp_path: Path) -> None:
    labels = write_digits(tmp_path, count=12)
    node = {"_target_": "mtl_runner.data.image_table.image_table", "root": str(tmp_path), "labels": "labels.csv",
            "tasks": {"digit": {"kind": "classification"}}}
    (tmp_path / "img" / "0003.png").write_bytes(b"not a png")
    with pytest.raises(ConfigError, match=re.escape(f"{labels}: column 'path' row 4: {tmp_path}/img/0003.png is not a decodable image")):
        check_dataset(node)
    (tmp_path / "img" / "0005.png").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(f"{labels}: column 'path' row 6: {tmp_path}/img/0005.png does not exist")):
        check_dataset(node)


def test_unreadable_images_during_training_are_skipped_then_stop_the_run(tmp_path: Path) -> None:
    write_digits(tmp_path, count=40)
    taskset = image_table(str(tmp_path), "labels.csv", {"digit": {"kind": "classification"}, "odd": {"kind": "binary"}},
                          image_size=8, split=(1.0, 0.0, 0.0), max_bad_fraction=0.05)
    (tmp_path / "img" / "0002.png").write_bytes(b"broken after the preflight")
    batches = list(taskset.train.batches(40, shuffle=False, generator=None, device=CPU))  # 1 of 40 bad: skipped
    _, targets = batches[0]
    assert targets["digit"][2].item() == IGNORE_INDEX and math.isnan(targets["odd"][2].item())
    assert taskset.train.unreadable == 1
    (tmp_path / "img" / "0007.png").write_bytes(b"")
    with pytest.raises(ConfigError, match="dataset.max_bad_fraction=0.05: 3 of 40 images read so far could not be decoded"):
        (tmp_path / "img" / "0009.png").write_bytes(b"")
        list(taskset.train.batches(40, shuffle=False, generator=None, device=CPU))


@pytest.mark.parametrize("arch, stages", [("mobilenet_v3_small", 13), pytest.param("resnet18", 5, marks=pytest.mark.slow),
                                         pytest.param("regnet_y_400mf", 5, marks=pytest.mark.slow)])
def test_torchvision_backbones_expose_their_stages(arch: str, stages: int) -> None:
    from mtl_runner.models.torchvision_backbone import TorchvisionBackbone

    backbone = TorchvisionBackbone((3, 32, 32), arch)
    assert len(backbone.stages) == stages and backbone.output_stride == 32
    assert backbone(torch.zeros(2, 3, 32, 32)).shape == (2, backbone.out_channels, 1, 1)


def test_torchvision_backbone_errors_are_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from mtl_runner.models import torchvision_backbone as tv

    with pytest.raises(ValueError, match="backbone.arch='resnet9000' is not a torchvision classification model"):
        tv.TorchvisionBackbone((3, 32, 32), "resnet9000")
    with pytest.raises(ValueError, match="backbone.arch=shufflenet_v2_x0_5: its stages cannot be derived"):
        tv.TorchvisionBackbone((3, 32, 32), "shufflenet_v2_x0_5")
    with pytest.raises(ValueError, match=r"backbone.weights='IMAGENET' is not available for resnet18; allowed: null, IMAGENET1K_V1, DEFAULT"):
        tv.check_weights("resnet18", "IMAGENET")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: "/nonexistent-hub")
    import torchvision.models._api as weights_api  # where the weights enum fetches from

    monkeypatch.setattr(weights_api, "load_state_dict_from_url", lambda *a, **k: (_ for _ in ()).throw(OSError("no network")))
    with pytest.raises(ValueError, match=r"could not fetch resnet18 weights .* \(no network\); run once on a machine with network access"):
        tv.check_weights("resnet18", "IMAGENET1K_V1")


@pytest.mark.slow
def test_the_docs_example_dataset_module_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/own-data.md's example module, as a user would save it, plugged in with
    ``dataset._target_``."""
    page = (Path(__file__).resolve().parent.parent / "docs" / "own-data.md").read_text()
    module = re.search(r"```python\n# my_pkg\.py\n(.*?)```", page, re.S)
    assert module is not None, "docs/own-data.md lost its my_pkg.py example"
    (tmp_path / "my_pkg.py").write_text(module.group(1))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_pkg", None)
    cfg = compose_config(["dataset=table", "~dataset", "+dataset._target_=my_pkg.my_dataset", "+dataset.num_rows=300",
                          "backbone=mlp", "baseline=off", *QUICK])
    results = run_experiment(cfg, tmp_path / "run")
    assert results["status"] == "completed" and set(results["tasks"]) == {"bigger", "sum"}


def test_image_table_reads_dense_targets_from_per_image_files(tmp_path: Path) -> None:
    """A segmentation mask (PNG, 255 = unlabelled) and a depth map (.npy) per image, resized
    with nearest neighbours to the image size."""
    rows = []
    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
        mask = np.zeros((8, 8), np.uint8)
        mask[:, 4:] = 2
        mask[0, 0] = 255
        Image.fromarray(mask).save(tmp_path / f"{i}_mask.png")
        np.save(tmp_path / f"{i}_depth.npy", np.full((8, 8), 1.0 + i, np.float32))
        rows.append({"path": f"{i}.png", "mask": f"{i}_mask.png", "depth": f"{i}_depth.npy", "label": i % 2})
    pd.DataFrame(rows).to_csv(tmp_path / "labels.csv", index=False)
    taskset = image_table(str(tmp_path), "labels.csv", {"seg": {"kind": "segmentation", "column": "mask", "num_classes": 3},
                                                        "depth": {"kind": "depth"}, "label": {"kind": "binary"}},
                          image_size=4, split=(1.0, 0.0, 0.0))
    x, y = next(taskset.train.batches(4, shuffle=False, generator=None, device=CPU))
    assert x.shape == (4, 3, 4, 4) and y["seg"].shape == (4, 4, 4) and y["depth"].shape == (4, 1, 4, 4)
    assert y["seg"][0, 0].tolist() == [IGNORE_INDEX, 0, 2, 2] and y["depth"][:, 0, 0, 0].tolist() == [1.0, 2.0, 3.0, 4.0]
    assert [t.kind for t in taskset.tasks] == ["segmentation", "depth", "binary"]


def test_a_loss_from_target_replaces_the_kind_loss_and_keeps_missing_labels_out(tmp_path: Path) -> None:
    """``loss: {_target_: torch.nn.HuberLoss, reduction: none}`` in the YAML: Hydra builds it,
    the task averages it over labelled rows only."""
    frame = pd.DataFrame({"x": np.linspace(-1, 1, 20), "y": [np.nan, 4.0] * 10})
    frame.to_csv(tmp_path / "t.csv", index=False)
    cfg = compose_config(["dataset=table", f"dataset.path={tmp_path / 't.csv'}", "dataset.split=[0.5,0.25,0.25]",
                          "dataset.tasks={y: {kind: regression, loss: {_target_: torch.nn.HuberLoss, reduction: none, delta: 1.0}}}"])
    check_dataset(cfg.dataset)  # the preflight instantiates the plain config itself
    from mtl_runner.build import build_taskset

    task = build_taskset(cfg).tasks[0]
    pred, target = torch.zeros(4, 1), torch.tensor([math.nan, 4.0, math.nan, 0.5])
    assert task.loss(pred, target).item() == pytest.approx((3.5 + 0.125) / 2)  # Huber: |e| - 0.5 beyond delta, e²/2 within
    flat = Task("y", "regression", 1, loss_fn=torch.nn.HuberLoss())  # reduction "mean": one value, refused
    with pytest.raises(ValueError, match=r"task 'y': its loss must return one value per target entry.*reduction: none"):
        flat.loss(pred, target)
