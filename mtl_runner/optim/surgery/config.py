"""``surgery=config``: conflict-free inverse gradients, ConFIG (Liu, Chen, Thuerey,
"ConFIG: Towards Conflict-free Training of Physics Informed Neural Networks", ICLR 2025,
eq. 2 with the projection-length magnitude)."""

from __future__ import annotations

import torch
from torch import Tensor

from mtl_runner.optim.surgery.base import GramianWeighting


class ConFIG(GramianWeighting):
    """With unit rows ``u_t = g_t / ||g_t||``: ``g_v = [u_1 ... u_T]^{T+} 1`` (the
    least-norm ``x`` with ``u_t . x = 1`` for every task), its direction
    ``e = g_v / ||g_v||`` and ``d = (sum_t g_t . e) e``. So ``d`` makes the same positive
    angle with every task gradient (equal projections onto every unit gradient), and its
    length is the sum of the tasks' projections onto it.

    A re-weighting of the rows, found from the Gramian alone: with ``D = diag(1 / ||g_t||)``
    and the cosine matrix ``C = D M D``, the pseudo-inverse identity ``A^+ = A^T (A A^T)^+``
    gives ``g_v = w_v @ J`` with ``w_v = D C^+ 1``, and
    ``d = (1^T M w_v / w_v^T M w_v) w_v @ J``. ``C^+`` comes from ``C``'s eigenvalues in
    float64; eigenvalues below ``T`` units of round-off of the Gramian's dtype (relative to
    the largest) count as zero. ``torch.linalg.eigh`` checks its result, which on CUDA is
    one device synchronisation per step (as in aligned_mtl).

    Scale: the paper's direction (a sum of projections: ``T g`` for ``T`` identical rows
    ``g``), which is docs/methods.md's convention; torchjd's ConFIG (unit preference
    vector) has the same scale.

    Deviations: the authors' code takes the pseudo-inverse of the ``T x P`` matrix of unit
    rows, whose singular values are the square roots of ``C``'s eigenvalues; the rank
    cut-off here applies to the eigenvalues, so for nearly dependent rows (singular values
    below about ``sqrt(T eps)``) this version already treats them as dependent. Zero rows
    have no direction: they are left out (weight 0), as if the task were absent. When no
    direction has a positive projection onto every task (``1`` is orthogonal to ``C``'s
    range, e.g. two opposite gradients), ``d = 0``.
    """

    def solve(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        size = gramian.shape[0]
        tolerance = size * torch.finfo(gramian.dtype).eps
        exact = gramian.double()
        norms = exact.diagonal().clamp_min(0).sqrt()
        nonzero = norms > norms.max() * tolerance
        inverse_norms = torch.where(nonzero, 1 / torch.where(nonzero, norms, 1), 0)
        cosines = inverse_norms[:, None] * exact * inverse_norms[None, :]
        eigenvalues, vectors = torch.linalg.eigh(cosines)
        kept = eigenvalues > eigenvalues.max().clamp_min(0) * tolerance
        inverse = torch.where(kept, 1 / torch.where(kept, eigenvalues, 1), 0)
        ones = torch.ones(size, dtype=exact.dtype, device=exact.device)
        pseudo_solution = vectors @ (inverse * (vectors.T @ ones))  # C^+ 1
        unit_weights = inverse_norms * pseudo_solution  # g_v = unit_weights @ J
        projected = exact @ unit_weights  # g_t . g_v
        squared_norm = unit_weights @ projected  # ||g_v||^2
        usable = squared_norm > 0
        length = torch.where(usable, projected.sum() / torch.where(usable, squared_norm, 1), 0)
        return (length * unit_weights).to(gramian.dtype)
