"""``surgery=aligned_mtl``: independent component alignment (Senushkin, Patakin,
Kuznetsov, Konushin, "Independent Component Alignment for Multi-Task Learning", CVPR 2023,
Algorithm 1)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from mtl_runner.optim.surgery.base import GramianWeighting, Space

ScaleMode = Literal["min", "median", "rmse"]


class AlignedMTL(GramianWeighting):
    """Replace the rows by the closest orthogonal system with equal singular values and
    sum them: with ``M = V diag(lambda) V^T`` (eigenvalues above round-off only),
    ``B = sqrt(lambda_scale) V diag(lambda)^-1/2 V^T`` and ``d = (B 1) @ J``. The aligned
    rows ``B J`` have Gram matrix ``lambda_scale`` times a projector, so every task's
    aligned gradient has the same norm and they are mutually orthogonal (the paper's
    condition number 1).

    ``scale_mode`` picks ``lambda_scale``: ``min`` (the paper's smallest kept
    eigenvalue, default), ``median`` or ``rmse`` (the mean), as in the authors' code.
    Scale: the authors' code sums the aligned gradients, which is docs/methods.md's
    convention; torchjd's AlignedMTL averages them (``1/T`` of this). All-zero rows:
    weights 1 (the direction is 0 either way). ``torch.linalg.eigh`` checks its result,
    which on CUDA is one device synchronisation per step.
    """

    def __init__(self, scale_mode: ScaleMode = "min", space: Space = "params", task_subset: int | None = None) -> None:
        if scale_mode not in ("min", "median", "rmse"):
            raise ValueError(f"surgery.scale_mode must be min, median or rmse, got {scale_mode!r}")
        super().__init__(space, task_subset)
        self.scale_mode = scale_mode

    def solve(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        return self.balance_transformation(gramian).sum(1)

    def balance_transformation(self, gramian: Tensor) -> Tensor:
        """The paper's ``B`` (identity when every row is zero)."""
        size = gramian.shape[0]
        eigenvalues, vectors = torch.linalg.eigh(gramian)
        tolerance = eigenvalues.max() * size * torch.finfo(gramian.dtype).eps
        kept = eigenvalues > tolerance
        inverse_sqrt = torch.where(kept, torch.where(kept, eigenvalues, 1).rsqrt(), 0)
        balance = self._scale(eigenvalues, kept).sqrt() * (vectors * inverse_sqrt) @ vectors.T
        identity = torch.eye(size, dtype=gramian.dtype, device=gramian.device)
        return torch.where(kept.any(), balance, identity)

    def _scale(self, eigenvalues: Tensor, kept: Tensor) -> Tensor:
        """``lambda_scale`` over the kept eigenvalues, without data-dependent shapes."""
        if self.scale_mode == "min":
            return torch.where(kept, eigenvalues, torch.inf).min().clamp_min(0)
        if self.scale_mode == "rmse":
            return (eigenvalues * kept).sum() / kept.sum().clamp_min(1)
        # median as torch.median takes it: the lower middle of the kept values, i.e.
        # position (count - 1) // 2 in ascending order (dropped values sort last as inf).
        count = kept.sum()
        ascending = torch.sort(torch.where(kept, eigenvalues, torch.inf)).values
        return ascending[((count - 1).clamp_min(0)) // 2].clamp_min(0)
