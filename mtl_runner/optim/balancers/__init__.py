"""Loss balancers (``balancer=NAME``): each method turns the task losses (and, for some,
gradient norms) into task weights, in its own module; the classes are exported here for
user code (``from mtl_runner.optim.balancers import GradNorm``). A new method subclasses
:class:`Balancer`, gets a YAML in ``conf/balancer/`` and a line here.
"""

from mtl_runner.optim.balancers.base import Balancer, GradRequirement, adam_step_
from mtl_runner.optim.balancers.dbmtl import DBMTL
from mtl_runner.optim.balancers.dwa import DWA
from mtl_runner.optim.balancers.famo import FAMO
from mtl_runner.optim.balancers.geometric import Geometric
from mtl_runner.optim.balancers.gradnorm import GradNorm
from mtl_runner.optim.balancers.imtl_l import IMTLL
from mtl_runner.optim.balancers.minmax import MinMax
from mtl_runner.optim.balancers.rlw import RLW
from mtl_runner.optim.balancers.static import Static
from mtl_runner.optim.balancers.stch import STCH
from mtl_runner.optim.balancers.uncertainty import Uncertainty
from mtl_runner.optim.balancers.uniform import Uniform

__all__ = [
    "Balancer", "GradRequirement", "adam_step_",
    "DBMTL", "DWA", "FAMO", "Geometric", "GradNorm", "IMTLL", "MinMax", "RLW", "Static", "STCH",
    "Uncertainty", "Uniform",
]
