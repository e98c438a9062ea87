"""``balancer=rlw``: Random Loss Weighting (Lin, Ye, Xu, Shi & Zhang, "Reasonable
Effectiveness of Random Weighting: A Litmus Test for Multi-Task Learning", TMLR 2022).

Every step draws ``eps ~ N(0, I_T)`` and uses ``w = T softmax(eps)``.

Scale: the paper (and LibMTL) use ``softmax(eps)``, which sums to 1; we multiply by ``T``
so that the weights sum to ``T`` like ``uniform`` (the project convention). Under SGD the
paper's version is the same with a ``T`` times smaller learning rate.

Randomness comes only from the run's seeded generator (``self.generator``, set in
``setup``), so a run is reproducible from its seed; the trainer checkpoints that generator.
Without one, RLW owns a default-seeded ``torch.Generator`` and carries its state in
``state_dict()`` (``_extra_state``) so that resuming continues the same sequence. The draw
happens on the generator's device and is copied to the losses' device (no host sync).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from mtl_runner.optim.balancers.base import Balancer
from mtl_runner.tasks import Task


class RLW(Balancer):
    def __init__(self) -> None:
        super().__init__()
        self._owns_generator = False

    def setup(self, tasks: Sequence[Task], generator: torch.Generator | None) -> None:
        super().setup(tasks, generator)
        self._owns_generator = generator is None
        if generator is None:
            self.generator = torch.Generator()

    def _rng(self) -> torch.Generator:
        if self.generator is None:  # weights() before setup(): behave as documented
            self.generator = torch.Generator()
            self._owns_generator = True
        return self.generator

    def weights(self, losses: Tensor) -> Tensor:
        rng = self._rng()
        eps = torch.randn(losses.shape[0], generator=rng, device=rng.device, dtype=torch.float32)
        w = losses.shape[0] * torch.softmax(eps, dim=0)
        return w.to(device=losses.device, dtype=losses.dtype, non_blocking=True)

    def get_extra_state(self) -> Any:
        if self._owns_generator and self.generator is not None:
            return {"generator_state": self.generator.get_state()}
        return {}

    def set_extra_state(self, state: Any) -> None:
        if isinstance(state, dict) and "generator_state" in state and self._owns_generator:
            self._rng().set_state(state["generator_state"])
