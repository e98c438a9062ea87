"""``surgery=gradvac``: gradient vaccine (Wang, Tsvetkov, Firat, Cao, "Gradient Vaccine:
Investigating and Improving Multi-task Optimization in Massively Multilingual Models",
ICLR 2021, Algorithm 1)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mtl_runner.optim.surgery.base import GramianWeighting, Space

#: Targets are kept inside ``|phi_hat| <= 1 - TARGET_MARGIN`` for the correction: a target
#: of exactly 1 would ask for an infinite multiple of ``g_j``.
TARGET_MARGIN = 1e-6


class GradVac(GramianWeighting):
    """For each task ``i``, ``g_i'`` starts at ``g_i``; for every other task ``j`` in a
    random order, with ``phi = cos(g_i', g_j)`` and the target ``phi_hat_ij``: where
    ``phi < phi_hat_ij``, add
    ``||g_i'|| (phi_hat sqrt(1 - phi^2) - phi sqrt(1 - phi_hat^2)) / (||g_j|| sqrt(1 - phi_hat^2)) g_j``
    to ``g_i'`` (which makes ``cos(g_i', g_j) = phi_hat`` exactly); then
    ``phi_hat_ij <- (1 - beta) phi_hat_ij + beta phi``. ``d = sum_i g_i'``.

    Targets start at 0 (so the first steps act like PCGrad) and are state: saved in
    :meth:`state_dict` and restored on resume. ``beta = 0.01`` is the paper's value;
    LibMTL and torchjd default to 0.5. The paper also applies the rule per layer or
    per parameter group; here it is whole-model (one ``phi_hat_ij`` per pair), the
    granularity the issue asks for.

    Every ``g_i'`` stays a combination of the rows, so the method tracks coefficients
    ``C`` (``g_i' = C_i @ J``) and needs only the Gramian, like torchjd's GradVac; all
    ``i`` advance together one position of their orders at a time (each ``g_i'`` only
    depends on its own order, so this equals the paper's loop over ``i``). The orders
    come from the run's seeded generator. Scale: the paper's sum of corrected rows,
    the project's convention. Degenerate input: a pair with a zero ``g_i'`` or ``g_j``
    has no cosine: no correction and no target update; non-finite rows are dropped.
    """

    #: No surgery.task_subset: its EMA targets are per task pair and updated every step.
    allows_task_subset = False

    def __init__(self, beta: float = 0.01, space: Space = "params", task_subset: int | None = None) -> None:
        if not 0 <= beta <= 1:
            raise ValueError(f"surgery.beta must be in [0, 1], got {beta!r}")
        super().__init__(space, task_subset)
        self.beta = beta
        self.targets: Tensor | None = None

    def setup(self, num_tasks: int, generator: torch.Generator | None) -> None:
        super().setup(num_tasks, generator)
        self.targets = torch.zeros(num_tasks, num_tasks)

    def state_dict(self) -> dict[str, Any]:
        return {"targets": None if self.targets is None else self.targets.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        targets = state["targets"]
        self.targets = None if targets is None else targets.clone()

    def solve(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        num_tasks = gramian.shape[0]
        targets = self._targets_for(gramian)
        coefficients = torch.eye(num_tasks, dtype=gramian.dtype, device=gramian.device)
        if num_tasks == 1:
            return coefficients[0]
        rows = torch.arange(num_tasks, device=gramian.device)
        orders = self.orders_of_others(num_tasks, gramian.device).T  # (T - 1, T): position k of every order
        norms = gramian.diagonal().clamp_min(0).sqrt()
        # Each pair (i, j) is visited once per call, so its target can be read up front
        # and written back after the loop (fewer tiny ops per position).
        pair_targets = targets[orders, rows].to(gramian.dtype)
        bounded = pair_targets.clamp(-1 + TARGET_MARGIN, 1 - TARGET_MARGIN)
        root_targets = (1 - bounded**2).sqrt()
        norms_j = norms[orders]
        denominators = norms_j * root_targets
        cosines, defined = [], []
        per_position = zip(orders, norms_j, pair_targets, bounded, root_targets, denominators)
        for j, norm_j, target, bound, root, denominator in per_position:
            products = coefficients @ gramian  # row i: g_i' . g_t for every t
            inner = products.gather(1, j[:, None])[:, 0]  # g_i' . g_j
            norm_i = (products * coefficients).sum(1).clamp_min(0).sqrt()
            scale = norm_i * norm_j
            ok = scale > 0
            cosine = (inner / torch.where(ok, scale, 1)).clamp(-1, 1)
            shift = norm_i * (bound * (1 - cosine**2).sqrt() - cosine * root) / torch.where(ok, denominator, 1)
            coefficients = coefficients.index_put((rows, j), torch.where(ok & (cosine < target), shift, 0), accumulate=True)
            cosines.append(cosine)
            defined.append(ok)
        moved = (1 - self.beta) * pair_targets + self.beta * torch.stack(cosines)
        updated = torch.where(torch.stack(defined), moved, pair_targets)
        targets = targets.index_put((orders, rows.expand_as(orders)), updated.to(targets.dtype))
        self.targets = targets
        return coefficients.sum(0)

    def _targets_for(self, gramian: Tensor) -> Tensor:
        """The targets on the Gramian's device (they come back on the CPU from a checkpoint)."""
        num_tasks = gramian.shape[0]
        if self.targets is None or self.targets.shape != (num_tasks, num_tasks):
            raise ValueError(
                f"surgery=gradvac was set up for {None if self.targets is None else self.targets.shape[0]} tasks "
                f"but got {num_tasks}: call setup(num_tasks, generator) first"
            )
        return self.targets.to(gramian.device)
