"""``sharing=ple``: Progressive Layered Extraction (Tang, Liu, Zhao, Gong, RecSys 2020).

``num_levels`` stacked Customized Gate Control levels (:mod:`~mtl_runner.models.sharing.cgc`).
At level ``j`` task ``t`` has its own experts and every level has shared experts; task
``t``'s experts read ``t``'s output of level ``j-1``, the shared experts read the shared
output of level ``j-1`` (both are the input at the first level). Task ``t``'s gate mixes
its own experts and the shared ones; every level but the last also has a shared gate that
mixes all the level's experts (every task's and the shared ones) into the shared output,
which is how the tasks' experts progressively feed the shared path. The last level's
task outputs feed the task heads (the paper's towers).

The backbone's stages are split into ``num_levels`` consecutive runs of (as nearly as
possible) equal length, and a level's experts are copies of its run (built from the
backbone, or a smaller one with ``expert``, as in ``sharing=mmoe``); so ``num_levels``
is at most the backbone's number of stages. The first level's gates read the flattened
input (as in MMoE and CGC), the later levels' gates the per-channel mean of the features
they gate (the plain features for vector backbones). With ``num_levels=1`` this is
``sharing=cgc`` exactly.

Gate usage is logged as ``ple/level<j>/<task>/<expert>`` and, for the shared gates,
``ple/level<j>/shared/<expert>`` (expert names as in ``sharing=cgc``).

Shared parameters: every parameter more than one task's loss reaches. The shared gates
route every expert of the levels below the last into the shared path, so those experts
and the task gates before the last two levels are shared; task ``t``'s own parameters
are its last-level experts and gate, its gate of the level before (whose output only
``t``'s last-level experts and gate read) and its head.
``forward_passes_per_input = T * num_task_experts + num_shared_experts`` (each level's
experts together cost that many passes through the level's stages).

Deviations: as for ``sharing=cgc`` (backbone experts, the runner's heads as towers), and
the deeper gates read per-channel means of feature maps rather than the whole maps. The
defaults (two levels, one task-specific and one shared expert per level) are the smallest
PLE; the paper varies levels and expert counts per experiment.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mtl_runner.models.sharing.base import BackboneFactory
from mtl_runner.models.sharing.cgc import ExtractionNetwork
from mtl_runner.tasks import Task


class PLE(ExtractionNetwork):
    def __init__(
        self,
        backbone: BackboneFactory,
        tasks: Sequence[Task],
        input_shape: Sequence[int],
        num_levels: int = 2,
        num_task_experts: int = 1,
        num_shared_experts: int = 1,
        expert: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(backbone, tasks, input_shape, num_levels, num_task_experts, num_shared_experts, expert)
