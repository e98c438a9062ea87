"""Datasets (``dataset=NAME``): each built-in one is a callable in its own module
(``mtl_runner.data.<name>.<name>``) returning a :class:`TaskSet`. Exported here is what a
user's own dataset is made of: the task set and its splits, and the preflight check of
its files (:func:`root_check`). The built-in datasets are not imported here: some pull
in torchvision, which ``mtl-run`` should not pay for at start-up.
"""

from mtl_runner.data.base import Batch, Inputs, LoaderSplit, Split, TaskSet, TensorSplit, default_num_workers
from mtl_runner.data.roots import check_dataset, expand_root, require_files, root_check, root_error
from mtl_runner.errors import DatasetRootError

__all__ = [
    "TaskSet", "Split", "TensorSplit", "LoaderSplit", "Batch", "Inputs", "default_num_workers",
    "root_check", "check_dataset", "expand_root", "require_files", "root_error", "DatasetRootError",
]
