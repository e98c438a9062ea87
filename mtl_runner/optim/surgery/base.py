"""Common interface of gradient-surgery methods.

A surgery method turns the per-task gradient matrix ``J`` (rows ``g_t`` of the shared
parameters, already scaled by the balancer's weights) into one update direction ``d``.
Scale convention for the whole project: ``none`` returns ``J.sum(0)``, and every other
method returns a direction on that scale (convex-combination methods multiply their
convex weights by ``T``), so that switching methods does not silently change the
effective learning rate under SGD.

Methods that are a re-weighting of the rows (``d = w @ J``) derive from
:class:`GramianWeighting` and only implement :meth:`GramianWeighting.solve`, which sees
the ``T x T`` Gramian ``M = J J^T`` with every entry finite. The engine can then avoid
materialising ``J`` (the features-space mode) and the same code serves both spaces.

Non-finite rows are handled in one place, :class:`GramianWeighting`: a task whose
gradient has a non-finite entry is dropped (weight 0, its row and column of the Gramian
zeroed before :meth:`~GramianWeighting.solve` sees it), so that one bad task does not
turn the whole direction into NaN. ``surgery(J)``, ``surgery.weights(M)`` and the
engine's calls all go through it; a subclass never filters on its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor

Space = Literal["params", "features"]


class Surgery:
    """A callable ``J (T, P) -> d (P,)`` on the same device and dtype as ``J``.

    Attributes set by the engine before training (see :meth:`setup`):
    ``generator`` is the run's seeded RNG for methods with randomness, so that a seed
    reproduces a run. ``last_weights`` holds the effective per-task weights of the last
    call where the method defines them (logged as ``surgery_weight/<task>``), else None.
    """

    #: False only for ``none``: the engine then takes the single-backward fast path.
    needs_jacobian: bool = True
    #: Whether the method is a pure re-weighting of the rows (features space allowed).
    is_row_weighting: bool = False

    def __init__(self, space: Space = "params") -> None:
        if space not in ("params", "features"):
            raise ValueError(f"surgery.space must be 'params' or 'features', got {space!r}")
        if space == "features" and not self.is_row_weighting:
            raise ValueError(
                f"surgery.space=features needs a method that re-weights task gradients; "
                f"{type(self).__name__} works on J itself, so use surgery.space=params"
            )
        self.space: Space = space
        self.generator: torch.Generator | None = None
        self.last_weights: Tensor | None = None

    def setup(self, num_tasks: int, generator: torch.Generator | None) -> None:
        """Called once by the engine with the number of tasks and the run's RNG."""
        self.generator = generator

    def __call__(self, jacobian: Tensor, losses: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def orders_of_others(self, num_tasks: int, device: torch.device) -> Tensor:
        """``(T, T-1)``; row ``i`` is a uniformly random order of the tasks other than
        ``i``, drawn from the run's generator (PCGrad's and GradVac's visiting orders)."""
        generator_device = self.generator.device if self.generator is not None else torch.device("cpu")
        keys = torch.rand(num_tasks, num_tasks, generator=self.generator, device=generator_device).to(device)
        keys.fill_diagonal_(2.0)  # task i sorts last in its own row and is cut off
        return keys.argsort(1)[:, : num_tasks - 1]

    # Stateful methods (EMA targets, cached weights) override these for checkpoints.
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state


class GramianWeighting(Surgery):
    """A surgery method whose direction is ``weights(J J^T) @ J``.

    ``support``: the support (free set) of the last exact solve, for methods whose
    solver tries it first on the CPU (:mod:`simplex`); saved in checkpoints, so that a
    resumed run takes the same path as the run it continues.
    """

    is_row_weighting = True
    support: Tensor | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"support": None if self.support is None else self.support.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        support = state.get("support")  # absent from checkpoints of earlier versions
        self.support = None if support is None else support.clone()

    def hint(self, shape: tuple[int, ...]) -> Tensor | None:
        """The last support, if it fits this solve's shape (else nothing to try)."""
        return self.support if self.support is not None and tuple(self.support.shape) == shape else None

    def solve(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        """The method itself: ``(T, T)`` Gramian (and optionally the losses) to ``(T,)``
        row weights. Subclasses implement this and nothing else of the weighting.

        The Gramian is clean: every entry is finite, and a dropped task's row and column
        are zero (as for a task whose gradient is zero). Whatever weight the solve gives a
        dropped task is replaced by 0 afterwards, so it needs no special case for them."""
        raise NotImplementedError

    def weights(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        """``(T, T)`` Gramian to ``(T,)`` row weights, a non-finite task weighted 0 (see
        the module docstring). Subclasses implement :meth:`solve`, not this."""
        return self._finite_weights(gramian, losses)[0]

    def _finite_weights(self, gramian: Tensor, losses: Tensor | None) -> tuple[Tensor, Tensor]:
        """The one place non-finite rows are dropped: a task is non-finite when its squared
        norm ``M_tt`` is (no pass over ``J`` is needed to find it). Returns the weights
        and which tasks were kept."""
        finite = torch.isfinite(gramian.diagonal())
        clean = torch.where(finite[:, None] & finite[None, :], gramian, 0.0)
        return torch.where(finite, self.solve(clean, losses), 0.0), finite

    def __call__(self, jacobian: Tensor, losses: Tensor | None = None) -> Tensor:
        return self.direction(jacobian, losses)

    def direction(
        self, jacobian: Tensor, losses: Tensor | None = None, row_scale: Tensor | None = None, *, read_flags: bool = False
    ) -> Tensor:
        """``self(row_scale[:, None] * jacobian)``, without that ``T x P`` temporary: the
        scaled rows' Gramian is ``(s s^T) * (J J^T)`` and the direction ``(weights * s) @ J``
        (the engine passes the balancer's weights as ``row_scale``).

        A dropped (non-finite) row has weight 0, but 0 * nan is nan, so the product
        zeroes such rows in a copy of ``J``. ``read_flags=True`` lets a caller on the CPU,
        where reading a flag back waits for nothing, skip that copy when every row is
        finite; otherwise it is always made, so that nothing here reads the device.
        The Gramian and the ``T x T`` problem run on one CPU thread: the problem is far
        too small to gain from threads, and waking them costs milliseconds on a busy
        machine; MKL's threaded product of a wide ``(T, P)`` matrix with its transpose
        was measured up to two orders of magnitude slower than on one thread (T = 10,
        P = 65536: 76 ms against 0.4 ms on a loaded 2-core machine, docs/performance.md).
        """
        with _one_cpu_thread(jacobian.device):
            gramian = jacobian @ jacobian.T
            if row_scale is not None:
                gramian = gramian * (row_scale[:, None] * row_scale[None, :])
            weights, finite = self._finite_weights(gramian, losses)
        weights = weights.to(jacobian.dtype)
        self.last_weights = weights
        if not (read_flags and bool(finite.all())):
            jacobian = torch.nan_to_num(jacobian, nan=0.0, posinf=0.0, neginf=0.0)
        return (weights if row_scale is None else weights * row_scale) @ jacobian


@contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run a tiny CPU computation (a ``T x T`` problem) on one intra-op thread."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
