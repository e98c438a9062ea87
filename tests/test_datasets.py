"""Benchmark datasets on tiny fixtures written in their exact on-disk formats, through
the whole pipeline (mtl-run writes results.json with each dataset's metrics), the dense
metrics against hand-computed values, and missing roots failing before anything is written."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from mtl_runner.cli import preflight
from mtl_runner.data.multimnist import load_mnist, overlay_pairs, write_idx
from mtl_runner.runner import run_experiment
from mtl_runner.tasks import Task
from tests.conftest import compose_config, conf_options, run_cli

QUICK = ["baseline=off", "trainer.epochs=1", "trainer.batch_size=4", "trainer.eval_batch_size=8", "trainer.progress=off", "diagnostics=off"]


# ----------------------------------------------------------------------------- fixtures
def write_mnist(root: Path, n_train: int = 24, n_test: int = 8) -> None:
    rng = np.random.default_rng(0)
    raw = root / "MNIST" / "raw"
    write_idx(raw / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (n_train, 28, 28)))
    write_idx(raw / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, n_train))
    write_idx(raw / "t10k-images-idx3-ubyte", rng.integers(0, 256, (n_test, 28, 28)))
    write_idx(raw / "t10k-labels-idx1-ubyte", rng.integers(0, 10, n_test))


def _jpeg(path: Path, rng: np.random.Generator, size: tuple[int, int] = (20, 24)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)


CELEBA_ATTRIBUTES = ["5_o_Clock_Shadow", "Smiling", "Male"]


def write_celeba(root: Path, partitions: tuple[int, ...] = (0, 0, 0, 0, 1, 1, 2, 2)) -> None:
    rng = np.random.default_rng(1)
    base = root / "celeba"
    files = [f"{i + 1:06d}.jpg" for i in range(len(partitions))]
    rows = [" ".join([f] + [str(v) for v in rng.choice([-1, 1], len(CELEBA_ATTRIBUTES))]) for f in files]
    base.mkdir(parents=True)
    (base / "list_attr_celeba.txt").write_text(f"{len(files)}\n{' '.join(CELEBA_ATTRIBUTES)}\n" + "\n".join(rows) + "\n")
    (base / "list_eval_partition.txt").write_text("".join(f"{f} {p}\n" for f, p in zip(files, partitions)))
    for f in files:
        _jpeg(base / "img_align_celeba" / f, rng, (22, 18))


def write_dense(root: Path, targets: tuple[str, ...], classes: int, counts: dict[str, int] | None = None, size: int = 32) -> None:
    rng = np.random.default_rng(2)
    for split, count in (counts or {"train": 5, "val": 2}).items():
        for i in range(count):
            folder = root / split
            for name in ("image", *targets):
                (folder / name).mkdir(parents=True, exist_ok=True)
            np.save(folder / "image" / f"{i}.npy", rng.random((size, size, 3), dtype=np.float32))
            label = rng.integers(-1, classes, (size, size)).astype(np.float32)
            depth = rng.random((size, size, 1), dtype=np.float32) * 5 * (rng.random((size, size, 1)) > 0.2)
            normal = rng.normal(size=(size, size, 3)).astype(np.float32)
            normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
            values = {"label": label, "label_7": label, "depth": depth, "normal": normal}
            for name in targets:
                np.save(folder / name / f"{i}.npy", values[name])


def write_office(root: Path, domains: tuple[str, ...], classes: tuple[str, ...] = ("back_pack", "bike"), per_class: int = 3) -> None:
    rng = np.random.default_rng(3)
    for domain in domains:
        for name in classes:
            for i in range(per_class):
                _jpeg(root / domain / name / f"frame_{i:04d}.jpg", rng)


def _results(tmp_path: Path) -> dict:
    runs = list((tmp_path / "outputs" / "runs").iterdir())
    assert len(runs) == 1
    return json.loads((runs[0] / "results.json").read_text())


# ---------------------------------------------------------------------- whole pipeline
PIPELINES = {
    "multimnist": (write_mnist, ["dataset=multimnist", "dataset.num_val=8", "backbone=lenet"],
                   {"left": {"accuracy"}, "right": {"accuracy"}}),
    "celeba": (write_celeba, ["dataset=celeba", "dataset.image_size=16", "dataset.attributes=[Smiling,Male]",
                              "backbone=small_cnn", "backbone.channels=[4,4,8,8]"],
               {"Smiling": {"accuracy"}, "Male": {"accuracy"}}),
    "nyuv2": (lambda r: write_dense(r, ("label", "depth", "normal"), 13),
              ["dataset=nyuv2", "backbone=segnet", "backbone.width=2"],
              {"seg": {"miou", "pix_acc"}, "depth": {"abs_err", "rel_err"},
               "normal": {"mean_angle", "median_angle", "within_11.25", "within_22.5", "within_30"}}),
    "cityscapes": (lambda r: write_dense(r, ("label_7", "depth"), 7),
                   ["dataset=cityscapes", "backbone=resnet18", "dataset.val_from_train=2"],
                   {"seg": {"miou", "pix_acc"}, "depth": {"abs_err", "rel_err"}}),
    "office31": (lambda r: write_office(r, ("amazon", "dslr", "webcam")),
                 ["dataset=office31", "dataset.image_size=16", "backbone=small_cnn", "backbone.channels=[4,4,8,8]"],
                 {"amazon": {"accuracy"}, "dslr": {"accuracy"}, "webcam": {"accuracy"}}),
}


@pytest.mark.parametrize("name", sorted(PIPELINES))
@pytest.mark.slow
def test_run_on_fixture_writes_metrics(tmp_path: Path, name: str) -> None:
    """The whole pipeline Hydra's job runs (build, train, test, results.json), in-process:
    a subprocess per dataset costs more than the run itself on a loaded machine."""
    write, overrides, expected = PIPELINES[name]
    root = tmp_path / "data"
    write(root)
    run_experiment(compose_config([*overrides, f"dataset.root={root}", *QUICK]), tmp_path / "run")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "completed"
    assert {t: set(v["metrics"]) for t, v in results["tasks"].items()} == expected
    for task in results["tasks"].values():
        for metric in task["metrics"].values():
            assert math.isfinite(metric["mtl"])


@pytest.mark.slow
def test_mtl_run_multimnist_lenet_from_the_command_line(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_mnist(root)
    result = run_cli([*PIPELINES["multimnist"][1], f"dataset.root={root}", *QUICK], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    results = _results(tmp_path)
    assert results["status"] == "completed" and set(results["tasks"]) == {"left", "right"}
    assert 0.0 <= results["tasks"]["left"]["metrics"]["accuracy"]["mtl"] <= 1.0


def test_office_home_domains_share_classes_and_split_deterministically(tmp_path: Path) -> None:
    from mtl_runner.build import build_taskset

    write_office(tmp_path, ("Art", "Clipart", "Product", "Real_World"), per_class=5)
    cfg = compose_config(["dataset=office_home", f"dataset.root={tmp_path}", "dataset.image_size=8"])
    first, second = build_taskset(cfg), build_taskset(cfg)
    assert first.task_names == ("Art", "Clipart", "Product", "Real_World") and first.multi_input
    assert {t.num_outputs for t in first.tasks} == {2}
    assert first.train.sizes == {d: 6 for d in first.task_names}  # 60% of 10
    assert first.val.sizes == first.test.sizes == {d: 2 for d in first.task_names}
    x, y = next(first.train.batches(4, shuffle=False, generator=None, device=torch.device("cpu")))
    assert x["Art"].dtype == torch.float32 and x["Art"].shape == (4, 3, 8, 8)
    assert torch.equal(first.test.data["Art"][0], second.test.data["Art"][0])


def test_celeba_reads_labels_and_partitions(tmp_path: Path) -> None:
    from mtl_runner.build import build_taskset

    write_celeba(tmp_path)
    cfg = compose_config(["dataset=celeba", f"dataset.root={tmp_path}", "dataset.image_size=8"])
    taskset = build_taskset(cfg)
    assert taskset.task_names == tuple(CELEBA_ATTRIBUTES)
    assert (len(taskset.train), len(taskset.val), len(taskset.test)) == (4, 2, 2)
    lines = (tmp_path / "celeba" / "list_attr_celeba.txt").read_text().splitlines()[2:]
    x, y = taskset.train.dataset[1]  # type: ignore[attr-defined]
    assert x.shape == (3, 8, 8)
    assert [int(y[a]) for a in CELEBA_ATTRIBUTES] == [int(v == "1") for v in lines[1].split()[1:]]


def test_multimnist_overlays_left_top_left_and_right_bottom_right(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    images, labels = load_mnist(tmp_path, "train")
    assert images.shape == (24, 28, 28) and labels.shape == (24,)
    left = torch.zeros(1, 28, 28, dtype=torch.uint8)
    left[0, 0, 0] = 200
    right = torch.zeros(1, 28, 28, dtype=torch.uint8)
    right[0, 27, 27] = 100
    canvas = overlay_pairs(torch.cat([left, right]), torch.tensor([1, 0]), size=36)
    assert canvas[0, 0, 0] == 200 and canvas[0, 33, 33] == 100 and int(canvas[0].count_nonzero()) == 2


def test_multimnist_is_deterministic_and_splits_mnist(tmp_path: Path) -> None:
    from mtl_runner.build import build_taskset

    write_mnist(tmp_path)
    overrides = ["dataset=multimnist", f"dataset.root={tmp_path}", "dataset.num_val=8"]
    first, again = build_taskset(compose_config(overrides)), build_taskset(compose_config(overrides))
    other = build_taskset(compose_config([*overrides, "dataset.seed=1"]))
    assert (len(first.train), len(first.val), len(first.test)) == (16, 8, 8)
    assert torch.equal(first.train.inputs, again.train.inputs)  # type: ignore[attr-defined]
    assert not torch.equal(first.train.inputs, other.train.inputs)  # type: ignore[attr-defined]
    _, labels = load_mnist(tmp_path, "train")
    assert torch.equal(first.train.targets["left"], labels[:16])  # type: ignore[attr-defined]


def test_augmentation_scales_depth_and_keeps_shapes(tmp_path: Path) -> None:
    from mtl_runner.build import build_taskset

    write_dense(tmp_path, ("label", "depth", "normal"), 13, counts={"train": 2, "val": 1})
    plain = build_taskset(compose_config(["dataset=nyuv2", f"dataset.root={tmp_path}", "dataset.augment=false"]))
    augmented = build_taskset(compose_config(["dataset=nyuv2", f"dataset.root={tmp_path}"]))
    torch.manual_seed(0)
    x, y = augmented.train.dataset[0]  # type: ignore[attr-defined]
    x0, y0 = plain.train.dataset[0]  # type: ignore[attr-defined]
    assert x.shape == x0.shape == (3, 32, 32) and y["seg"].dtype == torch.long
    assert y["depth"].max() <= y0["depth"].max() + 1e-6  # crops only enlarge, depth / scale
    assert set(y["seg"].unique().tolist()) <= set(y0["seg"].unique().tolist())


# -------------------------------------------------------------------- hand-computed metrics
def _metrics(task: Task, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    acc = task.accumulator(torch.device("cpu"))
    for pred, target in batches:
        acc.update(pred, target)
    return acc.compute()


def test_segmentation_miou_skips_absent_classes_and_ignored_pixels() -> None:
    task = Task("seg", "segmentation", 3)
    target = torch.tensor([[[0, 0, 1, 1, -1]]])
    labels = torch.tensor([[[0, 1, 1, 1, 2]]])
    logits = torch.nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2).float()
    # class 0: TP 1, union 2; class 1: TP 2, union 3; class 2 only on an ignored pixel: absent
    m = _metrics(task, [(logits, target)])
    assert m["miou"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert m["pix_acc"] == pytest.approx(3 / 4)
    split = _metrics(task, [(logits[..., :2], target[..., :2]), (logits[..., 2:], target[..., 2:])])
    assert split == pytest.approx(m)  # accumulated over the split, not averaged per batch


def test_depth_errors_over_valid_pixels_only() -> None:
    task = Task("depth", "depth", 1)
    target = torch.tensor([[[[2.0, 0.0], [4.0, 1.0]]]])
    pred = torch.tensor([[[[1.0, 5.0], [4.0, 3.0]]]])
    m = _metrics(task, [(pred, target)])
    assert m["abs_err"] == pytest.approx((1 + 0 + 2) / 3)
    assert m["rel_err"] == pytest.approx((1 / 2 + 0 + 2 / 1) / 3)
    assert float(task.loss(pred, target)) == pytest.approx(1.0)
    # pixel-weighted over batches: a second batch with one valid pixel (error 4, rel 4/2)
    more = (torch.tensor([[[[6.0, 9.0]]]]), torch.tensor([[[[2.0, 0.0]]]]))
    m2 = _metrics(task, [(pred, target), more])
    assert m2["abs_err"] == pytest.approx((1 + 0 + 2 + 4) / 4)
    assert m2["rel_err"] == pytest.approx((0.5 + 0 + 2 + 2) / 4)


def test_normal_angle_errors() -> None:
    task = Task("normal", "normals", 3)
    angles = [0.0, 10.0, 20.0, 45.0, 90.0]
    rad = torch.deg2rad(torch.tensor(angles))
    pred = torch.stack([torch.sin(rad), torch.zeros(5), torch.cos(rad)]) * 2.0  # not unit: normalised
    pred = torch.cat([pred, torch.tensor([[1.0], [0.0], [0.0]])], 1).view(1, 3, 1, 6)
    target = torch.tensor([[0.0, 0.0, 1.0]] * 5 + [[0.0, 0.0, 0.0]]).T.reshape(1, 3, 1, 6)  # last pixel unlabelled
    m = _metrics(task, [(pred, target)])
    assert m["mean_angle"] == pytest.approx(sum(angles) / 5, abs=1e-3)
    assert m["median_angle"] == pytest.approx(20.0, abs=0.01)
    assert (m["within_11.25"], m["within_22.5"], m["within_30"]) == pytest.approx((2 / 5, 3 / 5, 3 / 5))
    even = torch.tensor([0.0, 10.0, 20.0, 40.0])
    pred_even = torch.stack([torch.sin(torch.deg2rad(even)), torch.zeros(4), torch.cos(torch.deg2rad(even))]).view(1, 3, 1, 4)
    target_even = torch.tensor([0.0, 0.0, 1.0]).view(1, 3, 1, 1).expand(1, 3, 1, 4)
    assert _metrics(task, [(pred_even, target_even)])["median_angle"] == pytest.approx(15.0, abs=0.01)  # as np.median
    expected_loss = sum(1 - math.cos(math.radians(a)) for a in angles) / 5
    assert float(task.loss(pred, target)) == pytest.approx(expected_loss, abs=1e-6)


# ------------------------------------------------------------------- missing roots: preflight
MISSING = [
    (["dataset=multimnist", "backbone=lenet"], None, ["MNIST not found", "images-idx3", "yann.lecun.com"]),
    (["dataset=multimnist", "backbone=lenet"], lambda r: (r / "MNIST" / "raw").mkdir(parents=True),
     ["MNIST", "missing MNIST/raw/train-images-idx3-ubyte (and 3 more)", "download=true"]),
    (["dataset=celeba"], lambda r: (r / "celeba").mkdir(parents=True), ["CelebA", "list_attr_celeba.txt", "mmlab"]),
    (["dataset=nyuv2"], lambda r: write_dense(r, ("label", "depth"), 13, counts={"train": 2, "val": 1}),
     ["NYUv2", "missing train/normal/0.npy", "mtan"]),
    (["dataset=cityscapes"], lambda r: (write_dense(r, ("label", "depth"), 7, counts={"train": 3, "val": 1}),
                                        (r / "train" / "depth" / "2.npy").unlink()),
     ["Cityscapes", "train/depth/2.npy is missing", "mtan"]),
    (["dataset=nyuv2"], lambda r: (write_dense(r, ("label", "depth", "normal"), 13, counts={"train": 4, "val": 1}),
                                   (r / "train" / "image" / "1.npy").unlink()),
     ["NYUv2", "3 files in train/image but train/image/1.npy is missing"]),
    (["dataset=office31"], lambda r: write_office(r, ("amazon", "webcam")), ["Office-31", "dslr/", "domainadapt"]),
]


@pytest.mark.parametrize(("overrides", "prepare", "fragments"), MISSING, ids=[f"{m[0][0]}-{i}" for i, m in enumerate(MISSING)])
def test_missing_or_incomplete_root_fails_in_preflight(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], overrides: list[str], prepare: Any, fragments: list[str]
) -> None:
    root = tmp_path / "data"
    if prepare is not None:
        prepare(root)
    with pytest.raises(SystemExit) as exit_info:
        preflight([*overrides, f"dataset.root={root}", *QUICK])
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and str(root) in lines[0] and "expected" in lines[0], lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.slow
def test_missing_root_from_the_command_line_writes_nothing(tmp_path: Path) -> None:
    result = run_cli(["dataset=nyuv2", f"dataset.root={tmp_path / 'nowhere'}", *QUICK], cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "NYUv2 not found" in lines[0], result.stderr
    assert not (tmp_path / "outputs").exists(), "a run that cannot start must write nothing"


def test_multimnist_download_without_network_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision.datasets import MNIST

    from mtl_runner.build import build_taskset
    from mtl_runner.config import ConfigError

    def offline(self: MNIST, *args: object, **kwargs: object) -> None:
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: no route to host")

    monkeypatch.setattr(MNIST, "download", offline)
    cfg = compose_config(["dataset=multimnist", f"dataset.root={tmp_path}", "dataset.download=true"])
    with pytest.raises(ConfigError, match=r"could not be downloaded \(Error downloading.*get it from"):
        build_taskset(cfg)


# ------------------------------------------------------------------------ experiment recipes
@pytest.mark.parametrize("recipe", conf_options("experiment"))
def test_experiment_recipes_compose_and_validate(recipe: str) -> None:
    from mtl_runner.config import validate

    cfg = compose_config([f"experiment={recipe}"])
    validate(cfg)
    if recipe == "nyuv2_resnet50":
        assert cfg.dataset._target_.endswith("nyuv2") and cfg.backbone._target_.endswith("ResNetDilated")
        assert cfg.backbone.weights == "IMAGENET1K_V1" and cfg.optimizer._target_ == "torch.optim.Adam"
        assert (cfg.optimizer.lr, cfg.trainer.batch_size, cfg.trainer.epochs) == (1e-4, 8, 200)
        assert (cfg.trainer.lr_schedule, cfg.trainer.lr_step_epochs, cfg.trainer.lr_step_gamma) == ("step", 100, 0.5)
    # the command line still overrides a recipe
    assert compose_config([f"experiment={recipe}", "trainer.epochs=3"]).trainer.epochs == 3


def test_recipe_without_data_fails_in_preflight(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        preflight(["experiment=nyuv2_resnet50", f"dataset.root={tmp_path / 'nyu'}"])
    assert "NYUv2 not found" in capsys.readouterr().err


def test_step_schedule_halves_the_rate_every_n_epochs() -> None:
    from mtl_runner.assemble import build_run
    from mtl_runner.train.schedule import lr_factor

    cfg = compose_config(["dataset.num_train=8", "dataset.num_val=4", "dataset.num_test=4", "dataset.image_size=16",
                          "backbone.channels=[4,4,4,4]", "trainer.batch_size=4", "trainer.epochs=6",
                          "trainer.lr_schedule=step", "trainer.lr_step_epochs=2", "trainer.lr_step_gamma=0.5"])
    trainer = build_run(cfg, None).trainer
    factors = [lr_factor(trainer.settings, trainer.steps_per_epoch, step) for step in range(0, 12, 2)]  # 2 steps per epoch: one per epoch
    assert factors == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]


@pytest.mark.parametrize(
    ("overrides", "write", "fragment"),
    [
        (["dataset=multimnist", "dataset.num_val=24"], write_mnist, "dataset.num_val=24 must be >= 1 and below the 24"),
        (["dataset=celeba", "dataset.attributes=[Smiling,Bald]"], write_celeba, "unknown attribute 'Bald'"),
        (["dataset=nyuv2", "dataset.val_from_train=5"], lambda r: write_dense(r, ("label", "depth", "normal"), 13),
         "dataset.val_from_train=5 must be >= 0 and below the 5"),
    ],
)
def test_bad_dataset_values_fail_in_preflight(tmp_path: Path, capsys: pytest.CaptureFixture[str], overrides: list[str],
                                              write: Any, fragment: str) -> None:
    write(tmp_path)
    with pytest.raises(SystemExit):
        preflight([*overrides, f"dataset.root={tmp_path}"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0], lines


def test_trainer_num_workers_reaches_the_disk_loaders(tmp_path: Path) -> None:
    from mtl_runner.build import build_taskset
    from mtl_runner.data.base import default_num_workers

    write_dense(tmp_path, ("label", "depth", "normal"), 13, counts={"train": 2, "val": 1})
    chosen = build_taskset(compose_config(["dataset=nyuv2", f"dataset.root={tmp_path}", "trainer.num_workers=3"]))
    default = build_taskset(compose_config(["dataset=nyuv2", f"dataset.root={tmp_path}"]))
    assert [s.num_workers for s in (chosen.train, chosen.val, chosen.test)] == [3, 3, 3]  # type: ignore[attr-defined]
    assert default.train.num_workers == default_num_workers()  # type: ignore[attr-defined]
