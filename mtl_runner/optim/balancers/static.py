"""``balancer=static``: fixed, user-given task weights.

Two forms (exactly one may be used):

* ``weights={seg: 1.0, depth: 2.0}`` — a weight per task name; tasks not listed weigh 1
  (the ``uniform`` scale, so listing nothing is ``uniform``).
* ``main=seg aux_weight=0.1`` — auxiliary learning: the main task gets ``1 - lambda``,
  every other task ``lambda`` (``lambda = aux_weight`` in ``[0, 1]``). Note the total is
  ``1 + (T - 2) lambda``, not ``T``: with the same learning rate this form takes smaller
  steps than ``uniform``.

Configuration mistakes (an unknown task, a negative or non-finite weight, a main task that
does not exist, both forms at once) raise ``ValueError`` in :meth:`setup`, the first moment
the task names are known, with a one-line message naming the config key.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from mtl_runner.optim.balancers.base import Balancer
from mtl_runner.tasks import Task


class Static(Balancer):
    def __init__(
        self,
        weights: dict[str, float] | None = None,
        main: str | None = None,
        aux_weight: float = 0.5,
    ) -> None:
        super().__init__()
        # Hydra passes a DictConfig; keep a plain dict (validated in setup).
        self.user_weights: dict[str, object] | None = (
            None if weights is None else {str(k): v for k, v in dict(weights).items()}
        )
        self.main = main
        self.aux_weight = aux_weight
        self.register_buffer("static_weights", torch.ones(0))

    def setup(self, tasks: Sequence[Task], generator: torch.Generator | None) -> None:
        super().setup(tasks, generator)
        names = self.task_names
        known = ", ".join(names)
        if self.user_weights is not None and self.main is not None:
            raise ValueError(
                "balancer.weights and balancer.main: give per-task weights or a main task "
                "with aux_weight, not both"
            )
        values = [1.0] * len(names)
        if self.user_weights is not None:
            values = self._validated_weights(self.user_weights, names, known)
        elif self.main is not None:
            if self.main not in names:
                raise ValueError(f"balancer.main: no task named {self.main!r}; tasks are {known}")
            lam = _as_float(self.aux_weight, "balancer.aux_weight")
            if not 0.0 <= lam <= 1.0:
                raise ValueError(f"balancer.aux_weight: must be in [0, 1] (main gets 1 - aux_weight), got {lam}")
            values = [1.0 - lam if n == self.main else lam for n in names]
        self.static_weights = torch.tensor(values, dtype=torch.float32, device=self.static_weights.device)

    @staticmethod
    def _validated_weights(user: Mapping[str, object], names: tuple[str, ...], known: str) -> list[float]:
        for key in user:
            if key not in names:
                raise ValueError(f"balancer.weights.{key}: no task named {key!r}; tasks are {known}")
        values = []
        for name in names:
            if name not in user:
                values.append(1.0)
                continue
            value = _as_float(user[name], f"balancer.weights.{name}")
            if value < 0.0:
                raise ValueError(f"balancer.weights.{name}: weight must be >= 0, got {value}")
            values.append(value)
        return values

    def weights(self, losses: Tensor) -> Tensor:
        self._follow(losses.device)
        return self.static_weights.to(dtype=losses.dtype).clone()


def _as_float(value: object, key: str) -> float:
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{key}: must be a number, got {value!r}") from None
    if not math.isfinite(out):
        raise ValueError(f"{key}: must be finite, got {out}")
    return out
