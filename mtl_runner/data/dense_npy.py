"""Dense scene-understanding benchmarks in the preprocessed layout of MTAN and LibMTL.

Liu et al. (MTAN, 2019) distribute NYUv2 and Cityscapes as one ``.npy`` file per image
and per target, numbered ``0 .. n-1`` in each split folder::

    <root>/{train,val}/image/<i>.npy    float (H, W, 3), values in [0, 1]
                       label/<i>.npy    (H, W) class indices, -1 where unlabelled
                       depth/<i>.npy    (H, W, 1) or (H, W), 0 where no measurement
                       normal/<i>.npy   (H, W, 3) unit vectors, 0 where unlabelled

:func:`build_dense_npy` reads any subset of these folders; ``nyuv2`` and ``cityscapes``
say which. Files are read on demand (memory-mapped) through a ``LoaderSplit``. The
``val`` folder is the benchmark's test set (as in MTAN/LibMTL, which report on it);
``val_from_train=N`` holds out the last ``N`` training images for model selection,
otherwise validation is the test set too.

Training augmentation (``augment=true``), MTAN's: a random scale in {1, 1.2, 1.5}
crops ``1/scale`` of the image and resizes it back (bilinear for image and normals,
nearest for labels and depth, depth divided by the scale, since objects come closer),
then a horizontal flip with probability 1/2 (normals' x component negated).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, Subset

from mtl_runner.data.base import LoaderSplit, TaskSet
from mtl_runner.data.roots import expand_root, require_files, root_error
from mtl_runner.tasks import Task

SPLIT_FOLDERS = ("train", "val")
SCALES = (1.0, 1.2, 1.5)


@dataclass(frozen=True)
class DenseLayout:
    """What one benchmark stores: its name, tasks by folder, where to get it."""

    name: str  # as people write it, in messages
    option: str  # the dataset option (TaskSet.name)
    folders: dict[str, tuple[str, ...]]  # task name -> accepted folder names, first preferred
    obtain: str

    def expected(self) -> str:
        targets = ",".join(names[0] for names in self.folders.values())
        return f"<root>/{{train,val}}/{{image,{targets}}}/<i>.npy (the MTAN/LibMTL preprocessed layout)"


def _folder(split_dir: Path, names: Sequence[str]) -> Path:
    for name in names:
        if (split_dir / name).is_dir():
            return split_dir / name
    return split_dir / names[0]


def check_dense(layout: DenseLayout, root: str, val_from_train: int = 0) -> None:
    """Both split folders hold ``image`` and every task's folder, each with the files
    ``0.npy .. <n-1>.npy`` (n = the images found), and ``val_from_train`` leaves training
    images."""
    path = expand_root(root)
    needed = [f"{split}/image/0.npy" for split in SPLIT_FOLDERS]
    needed += [f"{split}/{_folder(path / split, names).name}/0.npy" for split in SPLIT_FOLDERS for names in layout.folders.values()]
    require_files(path, needed, layout.name, layout.expected(), layout.obtain)
    for split in SPLIT_FOLDERS:
        count = len(list((path / split / "image").glob("*.npy")))
        for names in (("image",), *layout.folders.values()):
            folder = _folder(path / split, names)
            missing = [f"{i}.npy" for i in range(count) if not (folder / f"{i}.npy").is_file()]
            if missing:
                problem = (
                    f"is incomplete: {count} files in {split}/image but {folder.relative_to(path)}/{missing[0]} is missing "
                    "(files are numbered 0 .. n-1)"
                )
                raise root_error(path, layout.name, problem, layout.expected(), layout.obtain)
    train_count = len(list((path / "train" / "image").glob("*.npy")))
    if not 0 <= val_from_train < train_count:
        raise ValueError(f"dataset.val_from_train={val_from_train} must be >= 0 and below the {train_count} training images in {path / 'train'}")


class DenseNpyDataset(Dataset):
    """One split folder: ``(image (3, H, W), {task: target})`` per index."""

    def __init__(self, split_dir: Path, tasks: Sequence[Task], folders: dict[str, Path], augment: bool) -> None:
        self.image_dir = split_dir / "image"
        self.count = len(list(self.image_dir.glob("*.npy")))
        self.tasks = tuple(tasks)
        self.folders = folders
        self.augment = augment

    def __len__(self) -> int:
        return self.count

    def _load(self, folder: Path, index: int) -> Tensor:
        return torch.from_numpy(np.array(np.load(folder / f"{index}.npy", mmap_mode="r")))

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        image = self._load(self.image_dir, index).float().permute(2, 0, 1)
        targets: dict[str, Tensor] = {}
        for task in self.tasks:
            raw = self._load(self.folders[task.name], index)
            if task.kind == "segmentation":
                targets[task.name] = raw.long()
            elif raw.dim() == 2:  # depth stored as (H, W)
                targets[task.name] = raw.float().unsqueeze(0)
            else:
                targets[task.name] = raw.float().permute(2, 0, 1)
        if self.augment:
            image, targets = self._scale_crop_flip(image, targets)
        return image.contiguous(), {k: v.contiguous() for k, v in targets.items()}

    def _scale_crop_flip(self, image: Tensor, targets: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        height, width = image.shape[-2:]
        scale = SCALES[int(torch.randint(len(SCALES), ()))]
        h, w = int(height / scale), int(width / scale)
        top = int(torch.randint(height - h + 1, ()))
        left = int(torch.randint(width - w + 1, ()))
        flip = bool(torch.rand(()) < 0.5)

        def crop(t: Tensor, mode: str) -> Tensor:
            patch = t[None, :, top : top + h, left : left + w].float()
            if mode == "bilinear":
                out = F.interpolate(patch, size=(height, width), mode="bilinear", align_corners=True)
            else:
                out = F.interpolate(patch, size=(height, width), mode="nearest")
            out = out[0]
            return out.flip(-1) if flip else out

        image = crop(image, "bilinear")
        out: dict[str, Tensor] = {}
        for task in self.tasks:
            t = targets[task.name]
            if task.kind == "segmentation":
                out[task.name] = crop(t[None], "nearest")[0].long()
            elif task.kind == "depth":
                out[task.name] = crop(t, "nearest") / scale
            else:  # normals
                normals = crop(t, "bilinear")
                if flip:
                    normals[0] = -normals[0]
                out[task.name] = normals
        return image, out


def build_dense_npy(
    layout: DenseLayout, tasks: Sequence[Task], root: str, augment: bool, val_from_train: int
) -> TaskSet:
    """A :class:`TaskSet` over ``root`` (see the module docstring)."""
    check_dense(layout, root, val_from_train)
    path = expand_root(root)

    def dataset(split: str, augmented: bool) -> DenseNpyDataset:
        folders = {t.name: _folder(path / split, layout.folders[t.name]) for t in tasks}
        return DenseNpyDataset(path / split, tasks, folders, augmented)

    train_full, train_plain = dataset("train", augment), dataset("train", False)
    test = dataset("val", False)
    cut = len(train_full) - val_from_train
    train: Dataset = Subset(train_full, range(cut)) if val_from_train else train_full
    val: Dataset = Subset(train_plain, range(cut, len(train_plain))) if val_from_train else test
    image = np.load(path / "train" / "image" / "0.npy", mmap_mode="r")
    input_shape = (int(image.shape[2]), int(image.shape[0]), int(image.shape[1]))
    splits = [LoaderSplit(d) for d in (train, val, test)]
    return TaskSet(layout.option, tuple(tasks), *splits, input_shape=input_shape)
