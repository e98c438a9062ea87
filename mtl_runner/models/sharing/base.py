"""Common interface of sharing strategies (architectures).

A strategy is an ``nn.Module`` whose ``forward(x)`` returns ``{task: prediction}`` and
which partitions its parameters into shared ones (``shared_parameters()``, the ones
gradient surgery and conflict diagnostics act on) and each task's own
(``task_parameters(task)``). Strategies with a single shared representation also split
their forward into ``encode`` and ``decode`` so the engine can work in the features
space (MGDA-UB style).

Multi-input datasets (each task has its own inputs) call :meth:`SharingModel.predict`
with a dict ``{task: inputs}``; it runs each task's inputs through
:meth:`SharingModel.forward_task`, which strategies override to compute only what that
task's prediction needs.

What each strategy shares (the parameters surgery and conflict diagnostics act on):
every parameter that more than one task's loss reaches. Parameters only one task's loss
reaches are that task's own, even where a penalty couples them (``soft``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mtl_runner.models.backbones import Backbone
from mtl_runner.tasks import Task

BackboneFactory = Callable[[], Backbone]


class SharingModel(nn.Module):
    #: True when encode/decode exist (one shared representation feeds every head).
    supports_features_space: bool = False

    def __init__(self, tasks: Sequence[Task]) -> None:
        super().__init__()
        self.tasks = tuple(tasks)
        self.task_names = tuple(t.name for t in tasks)

    def shared_parameters(self) -> list[nn.Parameter]:
        raise NotImplementedError

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        raise NotImplementedError

    def last_shared_parameters(self) -> list[nn.Parameter]:
        """The last shared layer's parameters (GradNorm's ``W``)."""
        raise NotImplementedError

    def encode(self, x: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no single shared representation")

    def decode(self, features: Tensor | Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Every head on the representation; a mapping ``{task: features}`` gives each
        head its own copy (the engine's per-task leaves: one backward pass then yields
        every task's gradient of the representation)."""
        raise NotImplementedError(f"{type(self).__name__} has no single shared representation")

    @property
    def forward_passes_per_input(self) -> int:
        """How many encoder passes one input costs at inference (1 for hard sharing)."""
        return 1

    def penalty(self) -> Tensor | None:
        """An extra loss term of the architecture itself (soft sharing's coupling)."""
        return None

    def diagnostics(self) -> dict[str, Tensor]:
        """Scalars worth logging (cross-stitch units, gate usage), as tensors."""
        return {}

    def forward_task(self, x: Tensor, task: str) -> Tensor:
        """``task``'s prediction for inputs ``x`` (multi-input datasets). The default runs
        the whole forward; strategies override it to skip the other tasks' heads."""
        return self(x)[task]

    def predict(self, inputs: Tensor | dict[str, Tensor]) -> dict[str, Tensor]:
        """``forward(inputs)`` for one input batch; for a dict ``{task: inputs}`` (multi-input
        datasets) each task's prediction on its own inputs. Tasks handed the same tensor
        object (the main tasks of an auxiliary-task wrapper) share one forward."""
        if isinstance(inputs, dict):
            out: dict[str, Tensor] = {}
            for name in self.task_names:
                if name in out:
                    continue
                x = inputs[name]
                together = [other for other in self.task_names if inputs[other] is x]
                if len(together) == 1:
                    out[name] = self.forward_task(x, name)
                else:
                    everything = self(x)
                    out.update({other: everything[other] for other in together})
            return {name: out[name] for name in self.task_names}
        return self(inputs)

    def parameter_counts(self) -> dict[str, Any]:
        """Scalar counts for ``results.json``: shared, and each task's own."""
        return {
            "shared": sum(p.numel() for p in self.shared_parameters()),
            "task_specific": {name: sum(p.numel() for p in self.task_parameters(name)) for name in self.task_names},
        }


def build_columns(backbone: BackboneFactory, tasks: Sequence[Task], input_shape: Sequence[int]) -> tuple[nn.ModuleDict, nn.ModuleDict]:
    """One encoder and one head per task, each built from the same random state, the
    state in which a single-task ``sharing=hard`` model of that task would be built (its
    encoder first, then its head). Under one seed every column therefore starts exactly
    as the single-task baseline of its task does, and all encoder copies start equal."""
    start = torch.get_rng_state()
    encoders, heads = nn.ModuleDict(), nn.ModuleDict()
    for task in tasks:
        torch.set_rng_state(start)
        encoders[task.name] = backbone()
        heads[task.name] = encoders[task.name].make_head(task, input_shape)
    return encoders, heads
