"""``sharing=dselect_k``: DSelect-k gates (Hazimeh, Zhao, Chowdhery, Sathiamoorthy, Chen,
Mazumder, Hong, Chi, NeurIPS 2021, "DSelect-k: Differentiable Selection in the Mixture of
Experts with Applications to Multi-Task Learning").

The experts are MMoE's (``sharing=mmoe``): ``num_experts`` copies of the backbone, or
smaller ones with ``expert``. Each task has its own gate, which selects at most ``k``
experts and stays differentiable while it learns which:

- a *single expert selector* has ``m = ceil(log2 E)`` logits ``z``; the smooth-step

      S(t) = 0                                   for t <= -gamma/2
             -2/gamma^3 t^3 + 3/(2 gamma) t + 1/2 for |t| <= gamma/2
             1                                   for t >= gamma/2

  turns them into soft bits, and code ``c`` (an ``m``-bit binary number) gets the weight
  ``r_c(z) = prod_i (S(z_i) if bit i of c is 1 else 1 - S(z_i))``; these weights sum to 1,
  and once every ``|z_i| >= gamma/2`` exactly one code has weight 1;
- the gate mixes ``k`` selectors with softmax weights ``alpha``:
  ``q = sum_j softmax(alpha)_j r(z^(j))``, so once the selectors' smooth-steps saturate
  the gate puts all its weight on at most ``k`` experts.

``per_example=true`` (the default, as MMoE's gates): ``z`` and ``alpha`` are linear
functions of the flattened input. ``per_example=false``: they are learned constants (the
paper's static gate). Task ``t``'s head reads ``sum_e q_te expert_e(x)``.

``entropy_reg = lambda > 0`` adds the paper's regulariser ``lambda * sum_t sum_j h(r(z_t^(j)))``
(``h`` the entropy over codes, averaged over the batch for per-example gates) to the loss,
which pushes the selectors to saturate; it is logged as ``loss/train/dselect_k_entropy``.

Gate usage, the batch mean of ``q_t``, is logged as ``dselect_k/<task>/expert<e>``.

Shared parameters: the experts. Task parameters: the gates and the heads.
``last_shared_parameters`` (GradNorm's ``W``): every expert's last stage.
``forward_passes_per_input = E`` (every expert runs on every input).

Deviations: when ``E`` is not a power of two the ``2^m`` codes are folded onto the experts
(code ``c`` selects expert ``c mod E``), so every code selects an expert and the gate is a
distribution; the paper states the method for powers of two. The selectors' logits start
near 0 (the per-example gate's rows for ``z`` are scaled down 100-fold from PyTorch's
default initialisation; the static ``z`` is drawn from ``U(-gamma/100, gamma/100)``), so no
smooth-step starts saturated. Every expert is evaluated even where the gate gives it no
weight (no conditional computation). The paper tunes ``gamma``, ``k``, the number of
experts and the entropy weight per dataset; the defaults here (``gamma=1``, ``k=2``, 4
experts, no entropy term) are a small starting point, not values taken from its tables.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mtl_runner.models.sharing.base import BackboneFactory
from mtl_runner.models.sharing.mmoe import ExpertPool, build_experts
from mtl_runner.tasks import Task


def smooth_step(t: Tensor, gamma: float) -> Tensor:
    """The paper's cubic smooth-step: 0 below ``-gamma/2``, 1 above ``gamma/2``,
    continuously differentiable in between (zero gradient once saturated)."""
    t = t.clamp(-gamma / 2, gamma / 2)
    return -2.0 / gamma**3 * t**3 + 3.0 / (2.0 * gamma) * t + 0.5


class StaticLogits(nn.Module):
    """Gate logits that do not depend on the input (the paper's static gate)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(size))

    def forward(self, x: Tensor) -> Tensor:
        return self.logits.expand(len(x), -1)


class DSelectK(ExpertPool):
    def __init__(
        self,
        backbone: BackboneFactory,
        tasks: Sequence[Task],
        input_shape: Sequence[int],
        num_experts: int = 4,
        k: int = 2,
        gamma: float = 1.0,
        entropy_reg: float = 0.0,
        per_example: bool = True,
        expert: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(tasks)
        if num_experts < 1:
            raise ValueError(f"sharing.num_experts must be >= 1, got {num_experts}")
        if k < 1:
            raise ValueError(f"sharing.k must be >= 1, got {k}")
        if gamma <= 0:
            raise ValueError(f"sharing.gamma must be > 0, got {gamma}")
        if entropy_reg < 0:
            raise ValueError(f"sharing.entropy_reg must be >= 0, got {entropy_reg}")
        self.experts = build_experts(backbone, num_experts, expert)
        self.k, self.gamma, self.entropy_reg = int(k), float(gamma), float(entropy_reg)
        self.num_bits = math.ceil(math.log2(num_experts))
        codes = torch.arange(2**self.num_bits)
        self.register_buffer("bits", ((codes[:, None] >> torch.arange(self.num_bits)) & 1).float(), persistent=False)
        self.register_buffer("fold", nn.functional.one_hot(codes % num_experts, num_experts).float(), persistent=False)
        in_dim = 1
        for s in input_shape:
            in_dim *= int(s)
        self.gates = nn.ModuleDict({t.name: self._gate(in_dim, per_example) for t in tasks})
        self.heads = nn.ModuleDict({t.name: self.experts[0].make_head(t, input_shape) for t in tasks})
        self._usage: dict[str, Tensor] = {}
        self._entropy: dict[str, Tensor] = {}
        self._last_entropy: Tensor | None = None

    def _gate(self, in_dim: int, per_example: bool) -> nn.Module:
        """Logits ``[z^(1) .. z^(k), alpha]``, the selectors' ``z`` starting far from saturation."""
        selector_logits = self.k * self.num_bits
        if not per_example:
            gate = StaticLogits(selector_logits + self.k)
            with torch.no_grad():
                gate.logits[:selector_logits].uniform_(-self.gamma / 100, self.gamma / 100)
            return gate
        linear = nn.Linear(in_dim, selector_logits + self.k)
        with torch.no_grad():
            linear.weight[:selector_logits].mul_(0.01)
            linear.bias[:selector_logits].mul_(0.01)
        return nn.Sequential(nn.Flatten(), linear)

    def selector_weights(self, logits: Tensor) -> Tensor:
        """``r(z^(j))`` over the ``2^m`` codes for each of the ``k`` selectors: ``(B, k, 2^m)``."""
        z = logits[:, : self.k * self.num_bits].float().reshape(len(logits), self.k, 1, self.num_bits)
        soft_bits = smooth_step(z, self.gamma)
        return (self.bits * soft_bits + (1 - self.bits) * (1 - soft_bits)).prod(dim=-1)

    def gate_weights(self, task: str, x: Tensor) -> tuple[Tensor, Tensor]:
        """Task ``task``'s gate ``q`` over the experts ``(B, E)`` and its selectors' ``r``."""
        logits = self.gates[task](x)
        codes = self.selector_weights(logits)
        alpha = torch.softmax(logits[:, self.k * self.num_bits :].float(), dim=-1)
        return torch.einsum("bj,bjc,ce->be", alpha, codes, self.fold), codes

    def _mix(self, x: Tensor, outs: Tensor, task: str) -> Tensor:
        gate, codes = self.gate_weights(task, x)
        self._usage[task] = gate.detach().mean(0)
        if self.entropy_reg > 0 and self.training and torch.is_grad_enabled():
            entropy = -(codes * codes.clamp_min(torch.finfo(codes.dtype).tiny).log()).sum(-1)
            self._entropy[task] = entropy.sum(-1).mean()
        return torch.einsum("be,eb...->b...", gate.to(outs.dtype), outs)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        outs = torch.stack([expert(x) for expert in self.experts])
        return {name: self.heads[name](self._mix(x, outs, name)) for name in self.task_names}

    def forward_task(self, x: Tensor, task: str) -> Tensor:
        outs = torch.stack([expert(x) for expert in self.experts])
        return self.heads[task](self._mix(x, outs, task))

    def penalty(self) -> Tensor | None:
        """The entropy regulariser of the gates of the last training forward (taken once:
        a later step's forward records its own)."""
        if not self._entropy:
            return None
        entropy = torch.stack(list(self._entropy.values())).sum()
        self._entropy = {}
        self._last_entropy = entropy.detach()
        return self.entropy_reg * entropy

    def diagnostics(self) -> dict[str, Tensor]:
        out = {f"dselect_k/{task}/expert{e}": usage[e] for task, usage in self._usage.items() for e in range(self.num_experts)}
        if self._last_entropy is not None:
            out["loss/train/dselect_k_entropy"] = self.entropy_reg * self._last_entropy
        return out
