"""``dataset=multimnist``: two overlapping MNIST digits per image, one task per digit.

The MultiMNIST of Sener & Koltun (2018, "Multi-Task Learning as Multi-Objective
Optimization", MGDA), built from torchvision's MNIST files as their loader builds it:
each MNIST image (the *left* digit) is paired with a uniformly drawn image of the same
split (the *right* digit); on a 36x36 canvas the left digit sits at the top left
(rows/columns 0-27), the right one at the bottom right (6-33), overlapping pixels keep
the brighter value, and the canvas is resized back to 28x28 with nearest-neighbour
sampling. Tasks: ``left`` and ``right``, 10-way classification each (cross-entropy,
accuracy). Inputs are normalised with MNIST's mean and standard deviation.

Pairs are drawn from ``seed`` (deterministic) and within each split: ``train`` and
``val`` are disjoint parts of MNIST's 60k training images (``val`` the last
``num_val``), ``test`` is built from MNIST's 10k test images.

On disk (what ``torchvision.datasets.MNIST(root, download=True)`` leaves)::

    <root>/MNIST/raw/train-images-idx3-ubyte   train-labels-idx1-ubyte
                     t10k-images-idx3-ubyte    t10k-labels-idx1-ubyte     (or the .gz files)

``download=true`` fetches them with torchvision when they are missing.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mtl_runner.data.base import TaskSet, TensorSplit
from mtl_runner.data.roots import expand_root, reading, require_files, root_check, root_error
from mtl_runner.errors import DatasetRootError
from mtl_runner.tasks import Task

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
EXPECTED = "<root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz] (torchvision's MNIST layout)"
OBTAIN = "http://yann.lecun.com/exdb/mnist/ (or run once with dataset.download=true on a machine with network access)"
MEAN, STD = 0.1307, 0.3081
CANVAS, OFFSET = 36, 6
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def raw_dir(root: str | Path) -> Path:
    return expand_root(str(root)) / "MNIST" / "raw"


def _find(raw: Path, name: str) -> Path | None:
    for candidate in (raw / name, raw / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def check_multimnist(root: str, download: bool = False, num_val: int = 10000, **_: object) -> None:
    """Preflight: the four MNIST files exist (raw or gzipped), unless they will be
    downloaded, and ``num_val`` leaves training images (read from the IDX header)."""
    if download:
        return
    raw = raw_dir(root)
    names = [n for pair in FILES.values() for n in pair]
    missing = [n for n in names if _find(raw, n) is None]
    if missing:  # raises, naming the first missing file (or the missing root)
        require_files(expand_root(root), [f"MNIST/raw/{m}" for m in missing], "MNIST", EXPECTED, OBTAIN)
    train_images = _find(raw, FILES["train"][0])
    assert train_images is not None
    _check_num_val(num_val, _idx_length(train_images))


def _idx_length(path: Path) -> int:
    """The first dimension of an IDX file, from its header alone."""
    opener = gzip.open if path.suffix == ".gz" else open
    with reading(path, "re-download MNIST"), opener(path, "rb") as f:
        header = f.read(8)
    if len(header) < 8 or header[:2] != b"\0\0" or header[3] < 1:
        raise DatasetRootError(f"{path}: not an IDX file (bad magic number); re-download MNIST")
    return int(struct.unpack(">I", header[4:8])[0])


def _check_num_val(num_val: int, train_count: int) -> None:
    if not 1 <= num_val < train_count:
        raise ValueError(f"dataset.num_val={num_val} must be >= 1 and below the {train_count} MNIST training images")


def read_idx(path: Path) -> np.ndarray:
    """An IDX array (the MNIST file format), from a raw or gzipped file."""
    opener = gzip.open if path.suffix == ".gz" else open
    with reading(path, "re-download MNIST"), opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_DTYPES:
        raise DatasetRootError(f"{path}: not an IDX file (bad magic number); re-download MNIST")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    dtype = np.dtype(IDX_DTYPES[data[2]])
    count = int(np.prod(dims)) if dims else 1
    offset = 4 + 4 * ndim
    if len(data) - offset < count * dtype.itemsize:
        raise DatasetRootError(f"{path}: truncated IDX file ({len(data) - offset} bytes of data for shape {dims}); re-download MNIST")
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(dims)


def _download(root: Path) -> None:
    from torchvision.datasets import MNIST

    try:
        for train in (True, False):
            MNIST(str(root), train=train, download=True)
    except Exception as exc:  # no network, mirror down, disk full: one line
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise root_error(root, "MNIST", f"could not be downloaded ({reason})", EXPECTED, OBTAIN) from None


def load_mnist(root: str | Path, split: str) -> tuple[Tensor, Tensor]:
    """MNIST ``split`` (``train`` or ``test``) as uint8 images (N, 28, 28) and labels (N,)."""
    raw = raw_dir(root)
    image_name, label_name = FILES[split]
    image_path, label_path = _find(raw, image_name), _find(raw, label_name)
    if image_path is None or label_path is None:
        require_files(expand_root(str(root)), [f"MNIST/raw/{image_name}", f"MNIST/raw/{label_name}"], "MNIST", EXPECTED, OBTAIN)
    assert image_path is not None and label_path is not None  # require_files raised otherwise
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DatasetRootError(
            f"{image_path}: {images.shape[0] if images.ndim else 0} images of shape {images.shape[1:]} do not match "
            f"{len(labels)} labels in {label_path}; re-download MNIST"
        )
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def overlay_pairs(images: Tensor, partner: Tensor, size: int = 28) -> Tensor:
    """MultiMNIST images (N, size, size) as uint8: ``images[i]`` at the top left and
    ``images[partner[i]]`` at the bottom right of a 36x36 canvas (pixel-wise maximum where
    they overlap), resized to ``size`` with nearest-neighbour sampling (PIL's rule)."""
    n, h, w = images.shape
    canvas = torch.zeros(n, CANVAS, CANVAS, dtype=images.dtype)
    canvas[:, :h, :w] = images
    right = canvas[:, OFFSET : OFFSET + h, OFFSET : OFFSET + w]
    canvas[:, OFFSET : OFFSET + h, OFFSET : OFFSET + w] = torch.maximum(right, images[partner])
    resized = F.interpolate(canvas.unsqueeze(1).float(), size=(size, size), mode="nearest-exact")
    return resized.squeeze(1).round().to(torch.uint8)


def _build(images: Tensor, labels: Tensor, generator: torch.Generator, size: int, device: torch.device) -> TensorSplit:
    partner = torch.randint(0, len(images), (len(images),), generator=generator)
    pixels = overlay_pairs(images, partner, size)
    x = ((pixels.float() / 255.0 - MEAN) / STD).unsqueeze(1)
    return TensorSplit(x.to(device), {"left": labels.to(device), "right": labels[partner].to(device)})


@root_check(check_multimnist)
def multimnist(
    root: str = "~/data",
    download: bool = False,
    num_val: int = 10000,
    image_size: int = 28,
    seed: int = 0,
    device: str = "cpu",
) -> TaskSet:
    """Build MultiMNIST's three splits from the MNIST files under ``root`` (see module doc)."""
    if image_size < 8:
        raise ValueError(f"dataset.image_size must be >= 8, got {image_size}")
    path = expand_root(root)
    names = [n for pair in FILES.values() for n in pair]
    if download and any(_find(raw_dir(path), n) is None for n in names):
        _download(path)
    check_multimnist(str(path), num_val=num_val)
    train_images, train_labels = load_mnist(path, "train")
    test_images, test_labels = load_mnist(path, "test")
    cut = len(train_images) - num_val
    target_device = torch.device(device)
    splits = []
    for offset, (images, labels) in enumerate(
        ((train_images[:cut], train_labels[:cut]), (train_images[cut:], train_labels[cut:]), (test_images, test_labels))
    ):
        generator = torch.Generator().manual_seed(seed * 3 + offset)
        splits.append(_build(images, labels, generator, image_size, target_device))
    digits = tuple(str(d) for d in range(10))
    tasks = (
        Task("left", "classification", 10, class_names=digits),
        Task("right", "classification", 10, class_names=digits),
    )
    return TaskSet("multimnist", tasks, *splits, input_shape=(1, image_size, image_size))


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write ``array`` (uint8) in the IDX format (gzipped when ``path`` ends in .gz)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if path.suffix == ".gz" else open
    path.parent.mkdir(parents=True, exist_ok=True)
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


__all__ = ["multimnist", "check_multimnist", "load_mnist", "overlay_pairs", "read_idx", "write_idx"]

