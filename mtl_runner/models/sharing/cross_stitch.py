"""``sharing=cross_stitch`` (Misra, Shrivastava, Gupta, Hebert, CVPR 2016).

One column (a backbone copy) per task. After every stage ``j`` a cross-stitch unit mixes
the columns' activations: ``x_t <- sum_s a_ts x_s`` with a learnable ``T x T`` matrix
``a`` per stage (one scalar per task pair, as in the paper's main model), initialised to
``init_self`` on the diagonal and ``(1 - init_self) / (T - 1)`` elsewhere (the paper's
``(0.9, 0.1)`` for two tasks), so each row sums to 1. Each task's head reads its own
column's last (stitched) activations. With identity units the model is ``T`` separate
networks (``sharing=none``); the columns are built exactly as ``sharing=none`` builds
them and carry the same names (``encoders.<task>``, ``heads.<task>``), so both start
from the same weights and ``init_from`` a ``sharing=none`` run loads every column.

Differences from the paper: its main results start the columns from separately trained
single-task networks (it also studies the same-initialisation variant used here, where
only the units and the task losses pull the columns apart), and it trains the units with
a learning rate scaled up from the network's (here they share the optimizer's rate).

The units ``a`` are logged as ``cross_stitch/stage<j>/<t>~<s>`` (the weight of column
``s`` in task ``t``'s input to the next stage).

Shared parameters: all columns and all units. A unit after every stage, the last one
included, lets every task's loss reach every column, so no column parameter belongs to
one task alone: surgery and the conflict diagnostics act on all of them (gradient
surgery then also resolves conflicts inside each column). Task parameters: the heads.
``last_shared_parameters`` (GradNorm's ``W``): every column's last stage and the last
unit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mtl_runner.models.sharing.base import BackboneFactory, SharingModel, build_columns
from mtl_runner.tasks import Task


class CrossStitch(SharingModel):
    def __init__(
        self, backbone: BackboneFactory, tasks: Sequence[Task], input_shape: Sequence[int], init_self: float = 0.9
    ) -> None:
        super().__init__(tasks)
        if not 0.0 <= init_self <= 1.0:
            raise ValueError(f"sharing.init_self must be in [0, 1], got {init_self}")
        self.encoders, self.heads = build_columns(backbone, tasks, input_shape)
        num_tasks = len(self.task_names)
        num_stages = len(next(iter(self.encoders.values())).stages)
        if num_tasks == 1:
            init = torch.ones(1, 1)
        else:
            init = torch.full((num_tasks, num_tasks), (1.0 - init_self) / (num_tasks - 1))
            init.fill_diagonal_(init_self)
        self.units = nn.ParameterList([nn.Parameter(init.clone()) for _ in range(num_stages)])

    def _columns(self, x: Tensor) -> Tensor:
        """The stitched activations after the last stage, stacked ``(T, B, ...)``."""
        columns = [encoder.stages for encoder in self.encoders.values()]
        features = [x] * len(columns)
        for j, unit in enumerate(self.units):
            stacked = torch.stack([stages[j](h) for stages, h in zip(columns, features)])
            mixed = torch.einsum("ts,s...->t...", unit.to(stacked.dtype), stacked)
            features = list(mixed.unbind(0))
        return torch.stack(features)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        features = self._columns(x)
        return {name: self.heads[name](features[t]) for t, name in enumerate(self.task_names)}

    def forward_task(self, x: Tensor, task: str) -> Tensor:
        return self.heads[task](self._columns(x)[self.task_names.index(task)])

    @property
    def forward_passes_per_input(self) -> int:
        return len(self.task_names)

    def shared_parameters(self) -> list[nn.Parameter]:
        return [*self.encoders.parameters(), *self.units.parameters()]

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        return list(self.heads[task].parameters())

    def last_shared_parameters(self) -> list[nn.Parameter]:
        return [p for encoder in self.encoders.values() for p in encoder.stages[-1].parameters()] + [self.units[-1]]

    def diagnostics(self) -> dict[str, Tensor]:
        names = self.task_names
        out: dict[str, Tensor] = {}
        for j, unit in enumerate(self.units):
            values = unit.detach()
            for t, a in enumerate(names):
                for s, b in enumerate(names):
                    out[f"cross_stitch/stage{j}/{a}~{b}"] = values[t, s]
        return out
