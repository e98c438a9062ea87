"""Gradient surgery (``surgery=NAME``): each method turns the task Jacobian into one
update direction, in its own module; the classes are exported here for user code
(``from mtl_runner.optim.surgery import PCGrad``). A new method subclasses
:class:`Surgery` (or :class:`GramianWeighting`, when it weights the rows by a
function of their Gramian), gets a YAML in ``conf/surgery/`` and a line here.
"""

from mtl_runner.optim.surgery.aligned_mtl import AlignedMTL
from mtl_runner.optim.surgery.base import GramianWeighting, Space, Surgery
from mtl_runner.optim.surgery.cagrad import CAGrad
from mtl_runner.optim.surgery.graddrop import GradDrop
from mtl_runner.optim.surgery.gradvac import GradVac
from mtl_runner.optim.surgery.imtl_g import IMTLG
from mtl_runner.optim.surgery.mgda import MGDA
from mtl_runner.optim.surgery.nash_mtl import NashMTL
from mtl_runner.optim.surgery.none import NoSurgery
from mtl_runner.optim.surgery.pcgrad import PCGrad
from mtl_runner.optim.surgery.upgrad import UPGrad

__all__ = [
    "Surgery", "GramianWeighting", "Space",
    "AlignedMTL", "CAGrad", "GradDrop", "GradVac", "IMTLG", "MGDA", "NashMTL", "NoSurgery", "PCGrad", "UPGrad",
]
