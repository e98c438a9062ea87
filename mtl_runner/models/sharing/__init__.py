"""Sharing strategies (``sharing=NAME``): how the tasks share a backbone, one module each;
the classes are exported here for user code (``from mtl_runner.models.sharing import
MTAN``). A new strategy subclasses :class:`SharingModel`, gets a YAML in
``conf/sharing/`` and a line here.
"""

from mtl_runner.models.sharing.base import BackboneFactory, SharingModel, build_columns
from mtl_runner.models.sharing.cgc import CGC
from mtl_runner.models.sharing.cross_stitch import CrossStitch
from mtl_runner.models.sharing.dselect_k import DSelectK
from mtl_runner.models.sharing.film import FiLM
from mtl_runner.models.sharing.hard import HardSharing
from mtl_runner.models.sharing.learning_to_branch import LearningToBranch
from mtl_runner.models.sharing.mmoe import MMoE
from mtl_runner.models.sharing.mtan import MTAN
from mtl_runner.models.sharing.none import Separate
from mtl_runner.models.sharing.ple import PLE
from mtl_runner.models.sharing.soft import SoftSharing

__all__ = [
    "BackboneFactory", "SharingModel", "build_columns",
    "CGC", "CrossStitch", "DSelectK", "FiLM", "HardSharing", "LearningToBranch", "MMoE", "MTAN", "PLE",
    "Separate", "SoftSharing",
]
