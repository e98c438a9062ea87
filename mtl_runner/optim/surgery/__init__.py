"""Gradient surgery (``surgery=NAME``): each method turns the task Jacobian into one
update direction, in its own module; the classes are exported here for user code
(``from mtl_runner.optim.surgery import PCGrad``). A new method subclasses
:class:`Surgery` (or :class:`GramianWeighting`, when it weights the rows by a
function of their Gramian), gets a YAML in ``conf/surgery/`` and a line here.
"""

from mtl_runner.optim.surgery.aligned_mtl import AlignedMTL
from mtl_runner.optim.surgery.base import GramianWeighting, Space, Surgery
from mtl_runner.optim.surgery.cagrad import CAGrad
from mtl_runner.optim.surgery.config import ConFIG
from mtl_runner.optim.surgery.dualproj import DualProj
from mtl_runner.optim.surgery.excess_mtl import ExcessMTL
from mtl_runner.optim.surgery.fairgrad import FairGrad
from mtl_runner.optim.surgery.graddrop import GradDrop
from mtl_runner.optim.surgery.gradvac import GradVac
from mtl_runner.optim.surgery.imtl_g import IMTLG
from mtl_runner.optim.surgery.mgda import MGDA
from mtl_runner.optim.surgery.moco import MoCo
from mtl_runner.optim.surgery.modo import MoDo
from mtl_runner.optim.surgery.nash_mtl import NashMTL
from mtl_runner.optim.surgery.none import NoSurgery
from mtl_runner.optim.surgery.pcgrad import PCGrad
from mtl_runner.optim.surgery.sdmgrad import SDMGrad
from mtl_runner.optim.surgery.upgrad import UPGrad

__all__ = [
    "GramianWeighting", "Space", "Surgery",
    "AlignedMTL", "CAGrad", "ConFIG", "DualProj", "ExcessMTL", "FairGrad", "GradDrop", "GradVac", "IMTLG",
    "MGDA", "MoCo", "MoDo", "NashMTL", "NoSurgery", "PCGrad", "SDMGrad", "UPGrad",
]
