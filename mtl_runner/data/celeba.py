"""``dataset=celeba``: CelebA faces, one binary classification task per attribute.

The 40 attributes of Liu et al. (2015) as 40 tasks (MGDA's CelebA setting, Sener &
Koltun 2018), or the subset named in ``attributes``. Each task is a 2-way
classification (cross-entropy on the attribute's -1/1 label mapped to 0/1; accuracy).
Splits are CelebA's own (``list_eval_partition.txt``: 0 train, 1 val, 2 test). Images
(178x218, aligned) are resized to ``image_size`` squared, as MGDA does (64x64), and
normalised with ImageNet's statistics, which pretrained ResNets expect.

On disk, torchvision's CelebA layout (what ``torchvision.datasets.CelebA(root)`` reads)::

    <root>/celeba/list_attr_celeba.txt      count line, 40 names, then "<file> ±1 x40" per image
                  list_eval_partition.txt   "<file> <0|1|2>" per image
                  img_align_celeba/<file>.jpg
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import functional as TF

from mtl_runner.data.base import LoaderSplit, TaskSet
from mtl_runner.data.roots import expand_root, require_files, root_check, root_error
from mtl_runner.errors import DatasetRootError
from mtl_runner.tasks import Task

FILES = ("celeba/list_attr_celeba.txt", "celeba/list_eval_partition.txt", "celeba/img_align_celeba")
EXPECTED = "<root>/celeba/{list_attr_celeba.txt,list_eval_partition.txt,img_align_celeba/*.jpg} (torchvision's CelebA layout)"
OBTAIN = "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html (Align&Cropped images and the Anno/Eval lists)"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PARTITIONS = {"train": 0, "val": 1, "test": 2}


def _read_attributes(path: Path) -> tuple[list[str], list[str], Tensor]:
    """Attribute names, file names and the (N, 40) 0/1 label matrix of ``list_attr_celeba.txt``."""
    lines = path.read_text().splitlines()
    if len(lines) < 3:
        raise DatasetRootError(f"{path}: expected a count line, a line of attribute names and one line per image")
    names = lines[1].split()
    files, rows = [], []
    for number, line in enumerate(lines[2:], start=3):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != len(names) + 1:
            raise DatasetRootError(f"{path}:{number}: expected a file name and {len(names)} labels, got {len(fields)} fields")
        files.append(fields[0])
        rows.append([int(v) > 0 for v in fields[1:]])
    return names, files, torch.tensor(rows, dtype=torch.long)


def _read_partition(path: Path) -> dict[str, int]:
    partition = {}
    for line in path.read_text().splitlines():
        fields = line.split()
        if len(fields) == 2:
            partition[fields[0]] = int(fields[1])
    return partition


def _chosen(attributes: str | list[str], names: list[str], source: Path) -> list[str]:
    if attributes == "all":
        return list(names)
    if isinstance(attributes, str) or not attributes:
        raise ValueError(f"dataset.attributes={attributes!r}: use all or a list of names from {source}")
    unknown = [a for a in attributes if a not in names]
    if unknown:
        raise ValueError(f"dataset.attributes: unknown attribute {unknown[0]!r}; allowed: all or names among {', '.join(names)}")
    return list(dict.fromkeys(attributes))


def check_celeba(root: str, attributes: str | list[str] = "all", **_: object) -> None:
    """The two list files and the image folder exist, the first and last listed images
    are there (a partial extraction usually lacks the last ones), and ``attributes``
    names attributes of the file."""
    path = expand_root(root)
    require_files(path, FILES, "CelebA", EXPECTED, OBTAIN)
    with open(path / FILES[0]) as f:
        f.readline()
        _chosen(attributes, f.readline().split(), path / FILES[0])
    listed = [line.split()[0] for line in (path / FILES[1]).read_text().splitlines() if line.split()]
    if not listed:
        raise root_error(path, "CelebA", f"is incomplete: {FILES[1]} lists no images", EXPECTED, OBTAIN)
    require_files(path, [f"{FILES[2]}/{listed[0]}", f"{FILES[2]}/{listed[-1]}"], "CelebA", EXPECTED, OBTAIN)


class CelebAImages(Dataset):
    def __init__(self, image_dir: Path, files: Sequence[str], labels: Tensor, attributes: Sequence[str], image_size: int) -> None:
        self.image_dir = image_dir
        self.files = list(files)
        self.labels = labels
        self.attributes = tuple(attributes)
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        with Image.open(self.image_dir / self.files[index]) as image:
            rgb = image.convert("RGB").resize((self.image_size, self.image_size), Image.BILINEAR)
        x = TF.normalize(TF.to_tensor(rgb), IMAGENET_MEAN, IMAGENET_STD)
        return x, {name: self.labels[index, j] for j, name in enumerate(self.attributes)}


@root_check(check_celeba)
def celeba(root: str = "~/data", attributes: str | list[str] = "all", image_size: int = 64) -> TaskSet:
    """CelebA from ``root`` (see the module docstring)."""
    if image_size < 8:
        raise ValueError(f"dataset.image_size must be >= 8, got {image_size}")
    check_celeba(root, attributes)
    path = expand_root(root)
    names, files, labels = _read_attributes(path / FILES[0])
    chosen = _chosen(attributes, names, path / FILES[0])
    columns = labels[:, [names.index(a) for a in chosen]]
    partition = _read_partition(path / FILES[1])
    unassigned = [f for f in files if f not in partition]
    if unassigned:
        raise root_error(path, "CelebA", f"is incomplete: {unassigned[0]} has no entry in {FILES[1]}", EXPECTED, OBTAIN)
    splits = []
    for split, code in PARTITIONS.items():
        rows = [i for i, f in enumerate(files) if partition[f] == code]
        if not rows:
            raise root_error(path, "CelebA", f"has no {split} images (partition {code}) in {FILES[1]}", EXPECTED, OBTAIN)
        dataset = CelebAImages(path / FILES[2], [files[i] for i in rows], columns[rows], chosen, image_size)
        splits.append(LoaderSplit(dataset))
    tasks = tuple(Task(name, "classification", 2, class_names=("no", "yes")) for name in chosen)
    return TaskSet("celeba", tasks, *splits, input_shape=(3, image_size, image_size))
