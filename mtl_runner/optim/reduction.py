"""What the gradient engine needs from data-parallel training, as a protocol on the
optim floor: the engine averages per-task rows and gradients over ranks through it,
and :class:`mtl_runner.train.distributed.DataParallel` implements it. So the engine
depends on nothing above optim/ and a test can hand it any object with these methods.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from torch import Tensor


class CrossRankReduction(Protocol):
    """In-place averages over the ranks of a data-parallel group, identical on every rank
    afterwards (the engine relies on that to keep the ranks in lockstep)."""

    def mean_(self, tensors: Iterable[Tensor]) -> None:
        """Average each tensor over ranks, in place."""
        ...

    def mean_grads_(self, params: Iterable[Tensor]) -> None:
        """Average the ``.grad`` of each parameter that has one over ranks, in place."""
        ...
