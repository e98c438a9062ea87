"""``sharing=mmoe``: Multi-gate Mixture-of-Experts (Ma, Zhao, Yi, Chen, Hong, Chi, KDD 2018).

``E = num_experts`` experts, each a copy of the backbone (or a smaller network: ``expert``
lists backbone arguments that replace the backbone's own for the experts, e.g.
``sharing.expert={channels:[8,16,32,32]}`` with ``backbone=small_cnn`` or
``sharing.expert={hidden:[64]}`` with ``backbone=mlp``). Each task ``t`` has a gate
``g_t(x) = softmax(W_t x)`` over the experts, computed from the flattened input ``x`` as in
the paper (and LibMTL), and its head reads ``sum_e g_te(x) expert_e(x)``.

``expert_dropout = p`` (training only): each expert is dropped for each example with
probability ``p`` and the gates are renormalised over the experts kept (at least one is
always kept). Without it gates tend to polarise onto one expert early.

Gate usage, the batch mean of ``g_t`` (before dropout), is logged as
``mmoe/<task>/expert<e>``.

Shared parameters: the experts. Task parameters: the gates and the heads.
``last_shared_parameters`` (GradNorm's ``W``): every expert's last stage.
``forward_passes_per_input = E`` (one pass per expert).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mtl_runner.models.sharing.base import BackboneFactory, SharingModel
from mtl_runner.tasks import Task


def build_experts(backbone: BackboneFactory, count: int, expert: dict[str, Any] | None) -> nn.ModuleList:
    """``count`` experts from the backbone factory; ``expert`` overrides its arguments (a
    smaller network per expert), and arguments it does not take are a one-line error."""
    overrides = dict(expert or {})
    try:
        return nn.ModuleList(backbone(**overrides) for _ in range(count))
    except TypeError as exc:
        raise ValueError(f"sharing.expert={overrides}: not arguments of the backbone ({exc})") from None


class ExpertPool(SharingModel):
    """A pool of ``num_experts`` experts shared by every task, each task with its own gate
    and head (MMoE, DSelect-k): what is shared and what belongs to a task follows from that
    layout alone, whatever the gate computes. Subclasses set ``experts``, ``gates`` and
    ``heads``."""

    experts: nn.ModuleList
    gates: nn.ModuleDict
    heads: nn.ModuleDict

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    @property
    def forward_passes_per_input(self) -> int:
        return self.num_experts

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.experts.parameters())

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        return [*self.gates[task].parameters(), *self.heads[task].parameters()]

    def last_shared_parameters(self) -> list[nn.Parameter]:
        return [p for expert in self.experts for p in expert.stages[-1].parameters()]


class MMoE(ExpertPool):
    def __init__(
        self,
        backbone: BackboneFactory,
        tasks: Sequence[Task],
        input_shape: Sequence[int],
        num_experts: int = 3,
        expert_dropout: float = 0.0,
        expert: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(tasks)
        if num_experts < 1:
            raise ValueError(f"sharing.num_experts must be >= 1, got {num_experts}")
        if not 0.0 <= expert_dropout < 1.0:
            raise ValueError(f"sharing.expert_dropout must be in [0, 1), got {expert_dropout}")
        self.experts = build_experts(backbone, num_experts, expert)
        self.expert_dropout = float(expert_dropout)
        in_dim = 1
        for s in input_shape:
            in_dim *= int(s)
        self.gates = nn.ModuleDict({t.name: nn.Sequential(nn.Flatten(), nn.Linear(in_dim, num_experts)) for t in tasks})
        self.heads = nn.ModuleDict({t.name: self.experts[0].make_head(t, input_shape) for t in tasks})
        self._usage: dict[str, Tensor] = {}

    def _experts(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Stacked expert outputs ``(E, B, ...)`` and this batch's keep mask ``(B, E)``."""
        outs = torch.stack([expert(x) for expert in self.experts])
        keep = None
        if self.training and self.expert_dropout > 0:
            keep = torch.rand(outs.shape[1], self.num_experts, device=outs.device) >= self.expert_dropout
            keep = keep | ~keep.any(dim=1, keepdim=True)  # never drop every expert
        return outs, keep

    def _mix(self, x: Tensor, outs: Tensor, keep: Tensor | None, task: str) -> Tensor:
        gate = torch.softmax(self.gates[task](x).float(), dim=-1).to(outs.dtype)  # (B, E)
        self._usage[task] = gate.detach().mean(0)
        if keep is not None:
            gate = gate * keep.to(gate.dtype)
            gate = gate / gate.sum(dim=1, keepdim=True).clamp_min(torch.finfo(gate.dtype).tiny)
        return torch.einsum("be,eb...->b...", gate, outs)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        outs, keep = self._experts(x)
        return {name: self.heads[name](self._mix(x, outs, keep, name)) for name in self.task_names}

    def forward_task(self, x: Tensor, task: str) -> Tensor:
        outs, keep = self._experts(x)
        return self.heads[task](self._mix(x, outs, keep, task))

    def diagnostics(self) -> dict[str, Tensor]:
        return {
            f"mmoe/{task}/expert{e}": usage[e] for task, usage in self._usage.items() for e in range(self.num_experts)
        }
