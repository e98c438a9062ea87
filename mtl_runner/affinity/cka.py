"""Representation similarity of the single-task baselines: linear CKA (Kornblith et al.,
"Similarity of Neural Network Representations Revisited", ICML 2019).

For representations ``X`` (``n x p``) and ``Y`` (``n x q``) of the same ``n`` inputs,
with ``K = X X^T``, ``L = Y Y^T`` and the centring matrix ``H = I - 11^T / n``:

    CKA(X, Y) = <HKH, HLH>_F / (||HKH||_F ||HLH||_F)

which equals ``||Y_c^T X_c||_F^2 / (||X_c^T X_c||_F ||Y_c^T Y_c||_F)`` for column-centred
``X_c, Y_c``. It is 1 for identical representations and invariant to orthogonal
transforms and isotropic scaling of either. Working with the ``n x n`` Gram matrices
keeps the cost independent of the feature size (a dense feature map is flattened).

Each task's representation is the shared representation (``model.encode``) of its
single-task baseline on the first ``n`` validation inputs; every baseline sees the same
inputs. A high CKA says two tasks, trained alone, learn similar features.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from mtl_runner.data.base import Split
from mtl_runner.models.sharing.base import SharingModel


def centred_gram(features: Tensor) -> Tensor:
    """``H X X^T H`` in float64 for ``features`` of shape ``(n, ...)``."""
    x = features.reshape(len(features), -1).double()
    x = x - x.mean(0, keepdim=True)  # H X: centring the columns centres the Gram matrix
    return x @ x.T


def cka_from_grams(k: Tensor, l: Tensor) -> Tensor:
    """Linear CKA of two centred Gram matrices; 0 when either representation is constant."""
    denominator = k.norm() * l.norm()
    return (k * l).sum() / denominator if denominator > 0 else torch.zeros((), dtype=k.dtype, device=k.device)


def linear_cka(x: Tensor, y: Tensor) -> Tensor:
    """Linear CKA of two representations of the same inputs (first dimension: examples)."""
    if len(x) != len(y):
        raise ValueError(f"CKA needs representations of the same inputs, got {len(x)} and {len(y)} examples")
    return cka_from_grams(centred_gram(x), centred_gram(y))


def held_out_inputs(split: Split, num_examples: int, device: torch.device) -> Tensor:
    """The first ``num_examples`` inputs of ``split`` (unshuffled). For per-task inputs
    (multi-input datasets, auxiliary-task wrappers) the first task's inputs are used."""
    chunks, total = [], 0
    for inputs, _ in split.batches(num_examples, shuffle=False, generator=None, device=device):
        x = inputs if isinstance(inputs, Tensor) else next(iter(inputs.values()))
        chunks.append(x[: num_examples - total])
        total += len(chunks[-1])
        if total >= num_examples:
            break
    return torch.cat(chunks)


@torch.no_grad()
def cka_matrix(models: Mapping[str, SharingModel], inputs: Tensor, batch_size: int = 256) -> Tensor:
    """``(T, T)`` linear CKA between the models' shared representations of ``inputs``
    (models in eval mode; order of ``models``), float64 on the CPU."""
    grams = []
    for model in models.values():
        model.eval()
        features = torch.cat([model.encode(inputs[s : s + batch_size]) for s in range(0, len(inputs), batch_size)])
        grams.append(centred_gram(features))
    size = len(grams)
    out = torch.ones(size, size, dtype=torch.float64)
    for i in range(size):
        for j in range(i + 1, size):
            out[i, j] = out[j, i] = cka_from_grams(grams[i], grams[j]).cpu()
    return out
