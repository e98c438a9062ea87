"""``dataset=nyuv2``: NYUv2 indoor scenes, three dense tasks (the MTAN/LibMTL protocol).

795 training and 654 test images at 288x384 in the MTAN layout (see
:mod:`mtl_runner.data.dense_npy`). Tasks and their standard losses and metrics:

- ``seg``: 13-class semantic segmentation, cross-entropy (unlabelled pixels ignored);
  mIoU and pixel accuracy.
- ``depth``: depth in metres, L1 over pixels with a measurement; absolute and relative
  error over those pixels.
- ``normal``: surface normals, ``1 - cos`` over labelled pixels; mean and median angle
  error (degrees) and the fractions within 11.25, 22.5 and 30 degrees.
"""

from __future__ import annotations

from mtl_runner.data.base import TaskSet
from mtl_runner.data.dense_npy import DenseLayout, build_dense_npy, check_dense
from mtl_runner.data.roots import root_check
from mtl_runner.tasks import Task

LAYOUT = DenseLayout(
    option="nyuv2",
    name="NYUv2",
    folders={"seg": ("label",), "depth": ("depth",), "normal": ("normal",)},
    obtain="the preprocessed NYUv2 of MTAN (https://github.com/lorenmt/mtan, 'nyuv2.zip') or LibMTL's examples/nyu",
)
CLASSES = ("bed", "books", "ceiling", "chair", "floor", "furniture", "objects", "painting", "sofa", "table", "tv", "wall", "window")


def check_nyuv2(root: str, val_from_train: int = 0, **_: object) -> None:
    check_dense(LAYOUT, root, val_from_train)


@root_check(check_nyuv2)
def nyuv2(root: str = "~/data/nyuv2", augment: bool = True, val_from_train: int = 0) -> TaskSet:
    """NYUv2 from ``root`` (see the module docstring)."""
    tasks = (
        Task("seg", "segmentation", len(CLASSES), class_names=CLASSES),
        Task("depth", "depth", 1),
        Task("normal", "normals", 3),
    )
    return build_dense_npy(LAYOUT, tasks, root, augment, val_from_train)
