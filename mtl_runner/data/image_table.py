"""``dataset=image_table``: a folder of images plus a CSV/Parquet table with a path column and
one column (or a list of columns) per task.

Labels go through the table machinery of :mod:`mtl_runner.data.table` (kinds, missing
labels, splits, one-line errors naming file, column and row). Dense tasks
(``segmentation``, ``depth``) name a column of per-image target files, relative to the
root like the images: PNG masks of class indices (``ignore_value``, 255 by default,
becomes unlabelled) or ``.npy`` arrays (depth: 0 means no measurement).

Images are decoded in the DataLoader's workers (PIL, as torchvision's ``ImageFolder``
does; RGB) and resized with torchvision's transforms to ``image_size`` squared and normalised with ImageNet's statistics, which pretrained
backbones expect. An image that cannot be read during training is skipped: its example
has no label for any task in that batch, and the split counts it. When the unreadable
share of the examples seen in a pass exceeds ``max_bad_fraction`` the run stops with a
one-line error naming the first bad file. The preflight checks that every listed file
exists and decodes the first :data:`PREFLIGHT_DECODES` images.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import functional as TF

from mtl_runner.data.base import Batch, LoaderSplit, TaskSet
from mtl_runner.data.roots import expand_root, root_check
from mtl_runner.data.table import KINDS, TaskSpec, encode_targets, parse_tasks
from mtl_runner.data.table_io import read_frame, read_splits, require_columns
from mtl_runner.errors import ConfigError, DatasetRootError
from mtl_runner.tasks import IGNORE_INDEX, Task

DENSE = ("segmentation", "depth")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PREFLIGHT_DECODES = 8


def _open(path: Path, mode: str) -> Tensor:
    """The image as a uint8 (C, H, W) tensor; PIL decodes, as torchvision's ImageFolder does."""
    with Image.open(path) as image:
        return TF.pil_to_tensor(image.convert(mode))


def _decode(path: Path, size: int) -> Tensor:
    image = TF.resize(_open(path, "RGB"), [size, size], antialias=True)
    return TF.normalize(image.float() / 255.0, list(IMAGENET_MEAN), list(IMAGENET_STD))


def _read_dense(path: Path, task: Task, size: int, ignore_value: int) -> Tensor:
    if path.suffix.lower() == ".npy":
        values = torch.from_numpy(np.load(path).astype(np.float32))
    else:
        values = _open(path, "L")[0].float()
    if task.kind == "segmentation":
        labels = TF.resize(values[None], [size, size], interpolation=TF.InterpolationMode.NEAREST)[0].long()
        return torch.where(labels == ignore_value, IGNORE_INDEX, labels)
    return TF.resize(values[None], [size, size], interpolation=TF.InterpolationMode.NEAREST)


def _unlabelled_like(target: Tensor) -> Tensor:
    return torch.full_like(target, IGNORE_INDEX) if not target.is_floating_point() else torch.full_like(target, float("nan"))


class ImageTableDataset(Dataset):
    """One split: image files, in-memory labels (``targets``, what the data summary reads)
    and per-image files of the dense tasks."""

    def __init__(self, root: Path, files: Sequence[str], targets: dict[str, Tensor], dense: dict[str, tuple[Task, list[str]]],
                 image_size: int, ignore_value: int) -> None:
        self.root, self.files, self.targets, self.dense = root, list(files), targets, dense
        self.image_size, self.ignore_value = image_size, ignore_value

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor], int]:
        """The image, its labels, and -1, or the index itself when the files cannot be read."""
        size = self.image_size
        labels = {name: t[index] for name, t in self.targets.items()}
        try:
            image = _decode(self.root / self.files[index], size)
            for name, (task, files) in self.dense.items():
                labels[name] = _read_dense(self.root / files[index], task, size, self.ignore_value)
            return image, labels, -1
        except (RuntimeError, OSError, ValueError):  # unreadable or undecodable: skipped, counted
            labels = {name: _unlabelled_like(t) for name, t in labels.items()}
            for name, (task, _) in self.dense.items():
                shape = (size, size) if task.kind == "segmentation" else (1, size, size)
                labels[name] = torch.full(shape, IGNORE_INDEX) if task.kind == "segmentation" else torch.zeros(shape)
            return torch.zeros(3, size, size), labels, index


class ImageTableSplit(LoaderSplit):
    """Batches of an :class:`ImageTableDataset` through a DataLoader; counts unreadable
    images per pass and stops the run beyond ``max_bad_fraction`` of the split."""

    dataset: ImageTableDataset

    def __init__(self, dataset: ImageTableDataset, max_bad_fraction: float) -> None:
        super().__init__(dataset)
        self.max_bad_fraction = max_bad_fraction
        self.unreadable = 0

    def batches(self, batch_size: int, *, shuffle: bool, generator: torch.Generator | None, device: torch.device) -> Iterator[Batch]:
        loader = DataLoader(self.dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                            num_workers=self.num_workers, pin_memory=device.type == "cuda")
        seen = bad = 0
        for x, y, unreadable in loader:
            seen += len(unreadable)
            skipped = unreadable[unreadable >= 0]  # a CPU tensor from the loader: no device sync
            if len(skipped):
                bad += len(skipped)
                if bad > self.max_bad_fraction * len(self.dataset):
                    raise ConfigError(
                        f"dataset.max_bad_fraction={self.max_bad_fraction}: {bad} of {seen} images read so far could not "
                        f"be decoded (e.g. {self.dataset.root / self.dataset.files[int(skipped[0])]}); fix or remove them, "
                        "or raise dataset.max_bad_fraction"
                    )
            yield x.to(device, non_blocking=True), {k: v.to(device, non_blocking=True) for k, v in y.items()}
        if bad:
            warnings.warn(f"image_table: skipped {bad} unreadable image(s) of {seen} in this pass", stacklevel=2)
        self.unreadable = bad


def _specs(tasks: Mapping[str, Any] | None) -> list[TaskSpec]:
    return parse_tasks(tasks, kinds=(*KINDS, *DENSE))


def check_image_table(root: str = ".", labels: str | None = None, tasks: Mapping[str, Any] | None = None,
                      path_column: str = "path", **_: object) -> None:
    """Preflight: the label table and its declared columns, every listed file, and the first
    images decode."""
    root_path = expand_root(root)
    if not root_path.is_dir():
        raise DatasetRootError(f"dataset.root={root}: no such directory; expected the folder the image paths are relative to")
    if labels is None:
        raise ConfigError("dataset.labels is required: a .csv/.parquet table with a path column and one column per task")
    file = root_path / labels if not Path(labels).is_absolute() else Path(labels)
    frame = read_frame(file)
    specs = _specs(tasks)
    require_columns(frame, [path_column, *(c for s in specs for c in s.columns)], str(file), "dataset.path_column / dataset.tasks")
    file_columns = [path_column, *(s.columns[0] for s in specs if s.kind in DENSE)]
    for column in file_columns:
        paths = frame[column].astype(str).to_numpy()
        exists = np.fromiter(((root_path / p).is_file() for p in paths), bool, len(paths))
        if not exists.all():
            row = int(np.flatnonzero(~exists)[0])
            raise DatasetRootError(f"{file}: column {column!r} row {row + 1}: {root_path / paths[row]} does not exist")
    for row, name in enumerate(frame[path_column].astype(str).head(PREFLIGHT_DECODES)):
        try:
            _open(root_path / name, "RGB")
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{file}: column {path_column!r} row {row + 1}: {root_path / name} is not a decodable image ({str(exc).splitlines()[0]})") from None


@root_check(check_image_table)
def image_table(
    root: str = ".",
    labels: str | None = None,
    tasks: Mapping[str, Any] | None = None,
    path_column: str = "path",
    image_size: int = 64,
    split_column: str | None = None,
    split: Sequence[float] = (0.8, 0.1, 0.1),
    missing_values: Sequence[Any] = (),
    ignore_value: int = 255,
    max_bad_fraction: float = 0.01,
    seed: int = 0,
) -> TaskSet:
    """Images and their labels; see the module docstring."""
    check_image_table(root, labels, tasks, path_column)
    if not 0.0 <= max_bad_fraction < 1.0:
        raise ConfigError(f"dataset.max_bad_fraction={max_bad_fraction}: a fraction in [0, 1)")
    root_path = expand_root(root)
    file = str(root_path / labels) if not Path(str(labels)).is_absolute() else str(labels)
    frames, _ = read_splits(file, split_column, split, seed)
    specs = _specs(tasks)
    ordered: list[Task] = []
    label_targets: dict[str, dict[str, Tensor]] = {}
    dense: dict[str, dict[str, tuple[Task, list[str]]]] = {s: {} for s in frames}
    for spec in specs:
        if spec.kind in DENSE:
            if spec.kind == "segmentation" and not spec.num_classes:
                raise ConfigError(f"dataset.tasks.{spec.name}.num_classes is required for a segmentation task")
            task = Task(spec.name, spec.kind, int(spec.num_classes or 1), **spec.task_arguments)  # type: ignore[arg-type]
            for s, frame in frames.items():
                dense[s][spec.name] = (task, frame[spec.columns[0]].astype(str).tolist())
        else:
            task, per_split = encode_targets(spec, frames, file, missing_values)
            for s, target in per_split.items():
                label_targets.setdefault(s, {})[spec.name] = target
        ordered.append(task)
    splits = {
        s: ImageTableSplit(ImageTableDataset(root_path, frame[path_column].astype(str).tolist(), label_targets.get(s, {}),
                                             dense[s], image_size, ignore_value), max_bad_fraction)
        for s, frame in frames.items()
    }
    return TaskSet("image_table", tuple(ordered), splits["train"], splits["val"], splits["test"], (3, image_size, image_size),
                   preprocessing={"file": file, "image_size": image_size, "normalise": {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}})
