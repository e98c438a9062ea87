"""Multi-domain image classification from class folders: one task per domain.

The Office benchmarks as LibMTL runs them (multi-input: each domain is a task with its
own images, all tasks share the label set): every domain's images are split at random,
but deterministically from ``seed``, into 60% train, 20% val and 20% test, resized to
``image_size`` squared and normalised with ImageNet's statistics. Pixels stay uint8 in
memory and are converted batch by batch on the training device.

On disk, one folder per domain and one per class inside it (the original Office-31
archive's extra ``images/`` level is accepted too)::

    <root>/<domain>/<class>/*.jpg        or   <root>/<domain>/images/<class>/*.jpg
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from mtl_runner.data.base import TaskSet
from mtl_runner.data.multi_input import MultiInputSplit
from mtl_runner.data.roots import expand_root, root_error
from mtl_runner.tasks import Task

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FRACTIONS = (0.6, 0.2)  # train, val; the rest is test


@dataclass(frozen=True)
class DomainLayout:
    name: str  # as people write it, in messages
    option: str  # the dataset option (TaskSet.name)
    domains: tuple[str, ...]
    obtain: str

    def expected(self) -> str:
        return f"<root>/{{{','.join(self.domains)}}}/<class>/*.jpg (one folder per domain, one per class)"


def _class_root(domain_dir: Path) -> Path:
    images = domain_dir / "images"
    return images if images.is_dir() else domain_dir


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def check_domains(layout: DomainLayout, root: str) -> None:
    """Every domain folder exists and has at least one class folder with images."""
    path = expand_root(root)
    if not path.is_dir():
        raise root_error(path, layout.name, "not found (no such directory)", layout.expected(), layout.obtain)
    for domain in layout.domains:
        if not (path / domain).is_dir():
            raise root_error(path, layout.name, f"is incomplete: missing domain folder {domain}/", layout.expected(), layout.obtain)
        classes = [c for c in _class_root(path / domain).iterdir() if c.is_dir() and _images(c)]
        if not classes:
            raise root_error(path, layout.name, f"is incomplete: {domain}/ has no class folders with images", layout.expected(), layout.obtain)


class _Normalise:
    """uint8 (N, 3, H, W) -> ImageNet-normalised floats, on the batch's device."""

    def __call__(self, x: Tensor) -> Tensor:
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        return (x.float() / 255.0 - mean) / std


def _load(files: Sequence[Path], image_size: int) -> Tensor:
    pixels = torch.empty(len(files), 3, image_size, image_size, dtype=torch.uint8)
    for i, file in enumerate(files):
        with Image.open(file) as image:
            rgb = image.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
        pixels[i] = torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)
    return pixels


def build_domains(layout: DomainLayout, root: str, image_size: int, seed: int) -> TaskSet:
    """A multi-input :class:`TaskSet`, task ``<domain>`` per domain (module docstring)."""
    if image_size < 8:
        raise ValueError(f"dataset.image_size must be >= 8, got {image_size}")
    check_domains(layout, root)
    path = expand_root(root)
    class_dirs = {d: {c.name: c for c in _class_root(path / d).iterdir() if c.is_dir()} for d in layout.domains}
    classes = tuple(sorted(set().union(*class_dirs.values())))
    generator = torch.Generator().manual_seed(seed)
    parts: dict[str, dict[str, tuple[Tensor, Tensor]]] = {"train": {}, "val": {}, "test": {}}
    for domain in layout.domains:
        files, labels = [], []
        for label, name in enumerate(classes):
            if name in class_dirs[domain]:
                found = _images(class_dirs[domain][name])
                files += found
                labels += [label] * len(found)
        if len(files) < 3:
            raise root_error(path, layout.name, f"has {len(files)} images in {domain}/; at least 3 are needed (train/val/test)", layout.expected(), layout.obtain)
        order = torch.randperm(len(files), generator=generator)
        n_train = max(1, int(FRACTIONS[0] * len(files)))
        n_val = max(1, int(FRACTIONS[1] * len(files)))
        cuts = {"train": order[:n_train], "val": order[n_train : n_train + n_val], "test": order[n_train + n_val :]}
        for split, index in cuts.items():
            chosen = [files[i] for i in index.tolist()]
            parts[split][domain] = (_load(chosen, image_size), torch.tensor([labels[i] for i in index.tolist()], dtype=torch.long))
    tasks = tuple(Task(domain, "classification", len(classes), class_names=classes) for domain in layout.domains)
    splits = [MultiInputSplit(parts[s], transform=_Normalise()) for s in ("train", "val", "test")]
    return TaskSet(layout.option, tasks, *splits, input_shape=(3, image_size, image_size), multi_input=True)
