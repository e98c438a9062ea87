"""``dataset=cityscapes``: Cityscapes street scenes, 7-class segmentation and depth.

The MTAN/LibMTL preprocessed Cityscapes: 2975 training and 500 test images at 128x256
in the layout of :mod:`mtl_runner.data.dense_npy`; MTAN names the label folder
``label_7`` (its 7-class version), LibMTL ``label``: either is read. Tasks: ``seg``
(7 classes, cross-entropy; mIoU, pixel accuracy) and ``depth`` (inverse depth as
distributed, L1 over pixels with a measurement; absolute and relative error).
"""

from __future__ import annotations

from mtl_runner.data.base import TaskSet
from mtl_runner.data.dense_npy import DenseLayout, build_dense_npy, check_dense
from mtl_runner.data.roots import root_check
from mtl_runner.tasks import Task

LAYOUT = DenseLayout(
    option="cityscapes",
    name="Cityscapes",
    folders={"seg": ("label", "label_7"), "depth": ("depth",)},
    obtain="the preprocessed Cityscapes of MTAN (https://github.com/lorenmt/mtan, 'cityscapes.zip') or LibMTL's examples/cityscapes",
)
CLASSES = ("flat", "construction", "object", "nature", "sky", "human", "vehicle")


def check_cityscapes(root: str, val_from_train: int = 0, **_: object) -> None:
    check_dense(LAYOUT, root, val_from_train)


@root_check(check_cityscapes)
def cityscapes(root: str = "~/data/cityscapes", augment: bool = True, val_from_train: int = 0) -> TaskSet:
    """Cityscapes from ``root`` (see the module docstring)."""
    tasks = (Task("seg", "segmentation", len(CLASSES), class_names=CLASSES), Task("depth", "depth", 1))
    return build_dense_npy(LAYOUT, tasks, root, augment, val_from_train)
