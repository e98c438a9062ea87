"""``sharing=cgc``: Customized Gate Control (Tang, Liu, Zhao, Gong, RecSys 2020, "Progressive
Layered Extraction (PLE)", the single-level model of that paper).

Every task ``t`` has ``num_task_experts`` experts of its own, and ``num_shared_experts``
experts serve all tasks. Task ``t``'s gate is a softmax over its own experts followed by
the shared ones, ``g_t(x) = softmax(W_t x)``, and its head reads the gated sum of those
experts' outputs: a task's gate never sees another task's experts, which is what
separates CGC from MMoE (``sharing=mmoe``, where every gate mixes every expert).

An expert is what it is in ``sharing=mmoe``: a copy of the backbone, or a smaller one
when ``expert`` lists backbone arguments that replace the backbone's own (e.g.
``sharing.expert={channels:[8,16,32,32]}``); so CGC runs on every backbone MMoE runs on.
The gates read the flattened input, as MMoE's do.

:class:`ExtractionNetwork` is written for any number of levels; ``sharing=ple``
(:mod:`mtl_runner.models.sharing.ple`) stacks them, and CGC is its one-level case.

Gate usage, the batch mean of each gate's weights, is logged as
``cgc/<task>/<expert>`` with ``<expert>`` ``<task>0``, ``<task>1``, ... for the task's own
experts and ``shared0``, ... for the shared ones (PLE adds ``level<j>/`` after the
prefix and logs its shared gates as ``<prefix>/level<j>/shared/<expert>``).

Shared parameters: every parameter more than one task's loss reaches. In CGC: the
shared experts. Task parameters: the task's own experts, its gate and its head.
``last_shared_parameters`` (GradNorm's ``W``): the last stage of every shared expert of
the last level. ``forward_passes_per_input = T * num_task_experts + num_shared_experts``.

Deviations: the paper's experts and towers are fully connected networks on embedded
features; here the experts are the runner's backbones (convolutional for images) and the
towers are the runner's task heads. The defaults (one task-specific and one shared
expert) are the smallest CGC; the paper varies the expert counts per experiment.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mtl_runner.models.backbones import Backbone
from mtl_runner.errors import option_name
from mtl_runner.models.sharing.base import BackboneFactory, SharingModel
from mtl_runner.tasks import Task


class ChannelSummary(nn.Module):
    """A gate's view of an intermediate feature map: the per-channel mean (a gate that
    read every position of a deep feature map would outgrow the experts it gates)."""

    def forward(self, h: Tensor) -> Tensor:
        return h.mean(dim=tuple(range(2, h.dim()))) if h.dim() > 2 else h


def gated_sum(gate: nn.Module, gate_input: Tensor, outputs: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """The gate's softmax weights ``(B, E)`` (computed in float32, as MMoE's are) and the
    weighted sum of the experts' ``outputs``."""
    stacked = torch.stack(list(outputs))
    weights = torch.softmax(gate(gate_input).float(), dim=-1).to(stacked.dtype)
    return weights, torch.einsum("be,eb...->b...", weights, stacked)


class ExtractionLevel(nn.Module):
    """One level: per task its own experts, shared experts, a gate per task over its own
    experts followed by the shared ones and, unless this is the last level, a shared gate
    over every expert of the level (the tasks' in task order, then the shared ones)."""

    def __init__(
        self,
        make_expert: Callable[[], nn.Module],
        task_names: Sequence[str],
        num_task_experts: int,
        num_shared_experts: int,
        make_gate_reader: Callable[[], nn.Module],
        gate_in: int,
        with_shared_gate: bool,
    ) -> None:
        super().__init__()
        self.task_names = tuple(task_names)
        self.task_experts = nn.ModuleDict(
            {t: nn.ModuleList([make_expert() for _ in range(num_task_experts)]) for t in task_names}
        )
        self.shared_experts = nn.ModuleList([make_expert() for _ in range(num_shared_experts)])
        self.task_gates = nn.ModuleDict(
            {t: nn.Sequential(make_gate_reader(), nn.Linear(gate_in, num_task_experts + num_shared_experts)) for t in task_names}
        )
        all_experts = len(task_names) * num_task_experts + num_shared_experts
        self.shared_gate = nn.Sequential(make_gate_reader(), nn.Linear(gate_in, all_experts)) if with_shared_gate else None
        self.usage: dict[str, Tensor] = {}

    def expert_names(self, gate: str) -> list[str]:
        """The experts gate ``gate`` (a task, or ``shared``) mixes, in its weights' order."""
        owners = self.task_names if gate == "shared" else (gate,)
        own = [f"{t}{i}" for t in owners for i in range(len(self.task_experts[t]))]
        return own + [f"shared{i}" for i in range(len(self.shared_experts))]

    def forward(
        self, task_inputs: Mapping[str, Tensor], shared_input: Tensor, tasks: Sequence[str]
    ) -> tuple[dict[str, Tensor], Tensor | None]:
        """Each of ``tasks``' gated outputs and, with a shared gate, the shared output
        (which needs every task's experts, so then every task is computed)."""
        if self.shared_gate is not None:
            tasks = self.task_names
        shared = [expert(shared_input) for expert in self.shared_experts]
        own = {t: [expert(task_inputs[t]) for expert in self.task_experts[t]] for t in tasks}
        out = {}
        for t in tasks:
            weights, out[t] = gated_sum(self.task_gates[t], task_inputs[t], own[t] + shared)
            self.usage[t] = weights.detach().mean(0)
        if self.shared_gate is None:
            return out, None
        every = [h for t in self.task_names for h in own[t]] + shared
        weights, mixed = gated_sum(self.shared_gate, shared_input, every)
        self.usage["shared"] = weights.detach().mean(0)
        return out, mixed


def _last_stage(expert: nn.Module) -> nn.Module:
    return expert.stages[-1] if isinstance(expert, Backbone) else expert[-1]


class ExtractionNetwork(SharingModel):
    """Stacked extraction levels over consecutive runs of the backbone's stages (one level:
    every expert is a whole backbone). The first level's gates read the flattened input,
    the later levels' gates the per-channel mean of their input features."""

    def __init__(
        self,
        backbone: BackboneFactory,
        tasks: Sequence[Task],
        input_shape: Sequence[int],
        num_levels: int,
        num_task_experts: int,
        num_shared_experts: int,
        expert: dict[str, Any] | None,
    ) -> None:
        super().__init__(tasks)
        if num_task_experts < 0:
            raise ValueError(f"sharing.num_task_experts must be >= 0, got {num_task_experts}")
        if num_shared_experts < 1:
            raise ValueError(f"sharing.num_shared_experts must be >= 1, got {num_shared_experts}")
        overrides = dict(expert or {})
        try:
            first = backbone(**overrides)
        except TypeError as exc:
            raise ValueError(f"sharing.expert={overrides}: not arguments of the backbone ({exc})") from None
        num_stages = len(first.stages)
        if not 1 <= num_levels <= num_stages:
            raise ValueError(f"sharing.num_levels must be in 1..{num_stages} (the backbone's stages), got {num_levels}")
        bounds = [round(j * num_stages / num_levels) for j in range(num_levels + 1)]

        def segment(start: int, stop: int) -> nn.Module:
            whole = backbone(**overrides)
            return whole if (start, stop) == (0, num_stages) else nn.Sequential(*whole.stages[start:stop])

        in_dim = 1
        for s in input_shape:
            in_dim *= int(s)
        levels = []
        for j in range(num_levels):
            start, stop = bounds[j], bounds[j + 1]
            levels.append(
                ExtractionLevel(
                    lambda start=start, stop=stop: segment(start, stop),
                    self.task_names,
                    num_task_experts,
                    num_shared_experts,
                    nn.Flatten if j == 0 else ChannelSummary,
                    in_dim if j == 0 else first.stage_channels[start - 1],
                    with_shared_gate=j < num_levels - 1,
                )
            )
        self.levels = nn.ModuleList(levels)
        self.heads = nn.ModuleDict({t.name: first.make_head(t, input_shape) for t in tasks})
        self.num_task_experts = num_task_experts
        self.num_shared_experts = num_shared_experts

    def _features(self, x: Tensor, tasks: Sequence[str]) -> dict[str, Tensor]:
        task_inputs: Mapping[str, Tensor] = {t: x for t in self.task_names}
        shared_input = x
        for level in self.levels[:-1]:
            task_inputs, mixed = level(task_inputs, shared_input, self.task_names)
            assert mixed is not None  # every level but the last has a shared gate
            shared_input = mixed
        return self.levels[-1](task_inputs, shared_input, tasks)[0]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        features = self._features(x, self.task_names)
        return {name: self.heads[name](features[name]) for name in self.task_names}

    def forward_task(self, x: Tensor, task: str) -> Tensor:
        return self.heads[task](self._features(x, (task,))[task])

    @property
    def forward_passes_per_input(self) -> int:
        return len(self.task_names) * self.num_task_experts + self.num_shared_experts

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        """The last level's experts and gate of ``task``, the gate before it (its output
        feeds only ``task``'s last-level experts and gate) and the head. Everything else
        reaches the shared gates, hence every task."""
        last = self.levels[-1]
        params = [*last.task_experts[task].parameters(), *last.task_gates[task].parameters()]
        if len(self.levels) > 1:
            params += list(self.levels[-2].task_gates[task].parameters())
        return params + list(self.heads[task].parameters())

    def shared_parameters(self) -> list[nn.Parameter]:
        own = {id(p) for name in self.task_names for p in self.task_parameters(name)}
        return [p for p in self.levels.parameters() if id(p) not in own]

    def last_shared_parameters(self) -> list[nn.Parameter]:
        return [p for expert in self.levels[-1].shared_experts for p in _last_stage(expert).parameters()]

    def diagnostics(self) -> dict[str, Tensor]:
        prefix = option_name(self)
        out: dict[str, Tensor] = {}
        for j, level in enumerate(self.levels):
            where = f"{prefix}/level{j}" if len(self.levels) > 1 else prefix
            for gate, usage in level.usage.items():
                for name, value in zip(level.expert_names(gate), usage):
                    out[f"{where}/{gate}/{name}"] = value
        return out


class CGC(ExtractionNetwork):
    def __init__(
        self,
        backbone: BackboneFactory,
        tasks: Sequence[Task],
        input_shape: Sequence[int],
        num_task_experts: int = 1,
        num_shared_experts: int = 1,
        expert: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(backbone, tasks, input_shape, 1, num_task_experts, num_shared_experts, expert)
