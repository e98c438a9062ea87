"""Which tasks should share an encoder: groupings into at most ``k`` groups from an
affinity matrix, and the hierarchical clustering behind the dendrogram.

Orientation: ``A[i, j]`` is the affinity *from* task ``i`` *onto* task ``j`` (TAG's
``Z_{i->j}``); symmetric measures (gradient cosine, CKA) read the same either way.

Objective (TAG's network selection, restricted to partitions): a task ``j`` in group
``G`` with other members scores the mean affinity onto it from them,
``mean_{i in G, i != j} A[i, j]``; a task alone in its group scores the mean of its
affinities to and from all other tasks (TAG's estimate for a task without partners). A
grouping's score is the mean over tasks; the best partition of the tasks into at most
``k`` groups is found by enumerating every set partition (Bell(8) = 4140 for 8 tasks), and
beyond :data:`EXHAUSTIVE_MAX_TASKS` by average-linkage clustering cut into ``k`` clusters.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform
from torch import Tensor

EXHAUSTIVE_MAX_TASKS = 8


@dataclass
class Grouping:
    groups: list[list[int]]
    score: float
    method: str  # "exhaustive" or "average-linkage"


def set_partitions(n: int, max_blocks: int) -> Iterator[list[list[int]]]:
    """Every partition of ``range(n)`` into at most ``max_blocks`` non-empty blocks, each
    once (element ``i`` joins an existing block or opens the next one)."""

    def extend(i: int, blocks: list[list[int]]) -> Iterator[list[list[int]]]:
        if i == n:
            yield [list(b) for b in blocks]
            return
        for block in blocks:
            block.append(i)
            yield from extend(i + 1, blocks)
            block.pop()
        if len(blocks) < max_blocks:
            blocks.append([i])
            yield from extend(i + 1, blocks)
            blocks.pop()

    if n == 0:
        return iter(())
    return extend(0, [])


def task_scores(affinity: Tensor, groups: list[list[int]]) -> list[float]:
    """Each task's score under ``groups`` (see the module docstring)."""
    a = affinity.double()
    n = len(a)
    off_diagonal = ~torch.eye(n, dtype=torch.bool)
    scores = [0.0] * n
    for group in groups:
        for j in group:
            others = [i for i in group if i != j]
            if others:
                scores[j] = float(a[others, j].mean())
            elif n > 1:
                scores[j] = float(torch.cat([a[j][off_diagonal[j]], a[:, j][off_diagonal[:, j]]]).mean())
    return scores


def grouping_score(affinity: Tensor, groups: list[list[int]]) -> float:
    scores = task_scores(affinity, groups)
    return sum(scores) / len(scores)


def best_grouping(affinity: Tensor, k: int) -> Grouping:
    """The recommended grouping into at most ``k`` shared encoders."""
    n = len(affinity)
    if n <= EXHAUSTIVE_MAX_TASKS:
        best = max(set_partitions(n, k), key=lambda groups: grouping_score(affinity, groups))
        return Grouping(best, grouping_score(affinity, best), "exhaustive")
    labels = fcluster(average_linkage(affinity), t=k, criterion="maxclust")
    groups = [sorted(np.flatnonzero(labels == c).tolist()) for c in sorted(set(labels.tolist()))]
    return Grouping(groups, grouping_score(affinity, groups), "average-linkage")


def average_linkage(affinity: Tensor) -> np.ndarray:
    """Scipy linkage of the tasks (average linkage), with distance ``max(S) - S`` for the
    symmetrised affinity ``S = (A + A^T) / 2`` over distinct pairs: the most related
    pair is at distance 0. Needs at least two tasks."""
    a = affinity.double().numpy()
    s = (a + a.T) / 2
    off = ~np.eye(len(s), dtype=bool)
    distance = np.where(off, s[off].max() - s, 0.0)
    return linkage(squareform(distance, checks=False), method="average")
