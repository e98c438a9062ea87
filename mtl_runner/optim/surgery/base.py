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

``task_subset=k`` (opt-in, docs/methods.md#task-subsets) makes a row weighting an
estimator: per step the engine computes the rows of ``k`` tasks drawn uniformly without
replacement (:meth:`Surgery.sample_tasks`), the method solves on their ``k x k`` Gramian,
and :meth:`GramianWeighting.sampled_direction` scales the result by ``T / k``, so that
the sum (``none``'s weights) is estimated without bias and every method keeps the scale
convention. Only methods without state carried across steps allow it
(:attr:`Surgery.allows_task_subset`): a state indexed by task would be updated from a
different subset every step.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor

from mtl_runner.errors import option_name

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
    #: Whether ``task_subset`` may be set: the method re-weights rows and carries no
    #: state from one step to the next (see the module docstring).
    allows_task_subset: bool = False

    def __init__(self, space: Space = "params", task_subset: int | None = None) -> None:
        if space not in ("params", "features"):
            raise ValueError(f"surgery.space must be 'params' or 'features', got {space!r}")
        if space == "features" and not self.is_row_weighting:
            raise ValueError(
                f"surgery.space=features needs a method that re-weights task gradients; "
                f"{type(self).__name__} works on J itself, so use surgery.space=params"
            )
        self.space: Space = space
        self.task_subset = _checked_task_subset(self, task_subset)
        self.generator: torch.Generator | None = None
        #: Draws the task subsets: a CPU generator of its own (the engine needs the
        #: subset on the host to choose its passes, and the run's generator keeps the
        #: same stream with and without subsets), seeded from the run's generator, so
        #: that a seed reproduces a run and every ddp rank draws the same subsets.
        self.subset_generator: torch.Generator | None = None
        self.last_weights: Tensor | None = None

    def setup(self, num_tasks: int, generator: torch.Generator | None) -> None:
        """Called once by the engine with the number of tasks and the run's RNG."""
        self.generator = generator
        if self.task_subset is not None:
            seed = generator.initial_seed() if generator is not None else 0
            self.subset_generator = torch.Generator().manual_seed(seed + _SUBSET_SEED_OFFSET)

    def sample_tasks(self, num_tasks: int) -> Tensor | None:
        """This step's task subset: ``k`` distinct task indices in increasing order (a
        CPU tensor), uniformly at random; None when every task is used (no
        ``task_subset``, or ``k >= T``: the exact method, no draw)."""
        if self.task_subset is None or self.task_subset >= num_tasks:
            return None
        if self.subset_generator is None:  # setup() was not called: user code
            self.subset_generator = torch.Generator().manual_seed(_SUBSET_SEED_OFFSET)
        return torch.randperm(num_tasks, generator=self.subset_generator)[: self.task_subset].sort().values

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
    #: True for a stateless weighting; a subclass that carries per-task state across
    #: steps (EMA targets, warm starts that decide the result) sets it False.
    allows_task_subset = True
    support: Tensor | None = None

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"support": None if self.support is None else self.support.clone()}
        if self.subset_generator is not None:
            state["subset_rng"] = self.subset_generator.get_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        support = state.get("support")  # absent from checkpoints of earlier versions
        self.support = None if support is None else support.clone()
        if self.subset_generator is not None and state.get("subset_rng") is not None:
            self.subset_generator.set_state(state["subset_rng"])

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

    def sampled_direction(
        self,
        rows: Tensor,
        subset: Tensor,
        num_tasks: int,
        losses: Tensor | None = None,
        row_scale: Tensor | None = None,
        *,
        read_flags: bool = False,
    ) -> Tensor:
        """The task-subset estimator (docs/methods.md#task-subsets): ``rows`` are the
        ``k`` sampled tasks' rows (``subset``'s order), ``losses`` and ``row_scale`` are
        for all ``T`` tasks. The method solves the ``k``-task problem, and the result is
        multiplied by ``T / k``: for the sum (weights 1) the expectation over subsets is
        the exact ``J.sum(0)``, and a convex-combination method stays on ``T``'s scale.
        ``last_weights`` is ``(T,)``: ``T / k`` times the method's weight for a sampled
        task, 0 for the others, so its mean over steps is the expected weight."""
        index = subset.to(rows.device)
        direction = self.direction(
            rows,
            None if losses is None else losses[index.to(losses.device)],
            None if row_scale is None else row_scale[index.to(row_scale.device)],
            read_flags=read_flags,
        )
        factor = num_tasks / subset.numel()
        sampled = self.last_weights
        if sampled is not None:
            self.last_weights = sampled.new_zeros(num_tasks).index_copy_(0, index.to(sampled.device), factor * sampled)
        return factor * direction


#: Offsets the subset generator's seed from the run's method generator (seed + 1), so the
#: two streams differ; the value itself has no meaning.
_SUBSET_SEED_OFFSET = 7919


def _checked_task_subset(surgery: Surgery, task_subset: int | None) -> int | None:
    """``surgery.task_subset``'s value rules, one line each (see the module docstring)."""
    if task_subset is None:
        return None
    if isinstance(task_subset, bool) or not isinstance(task_subset, int) or task_subset < 1:
        raise ValueError(f"surgery.task_subset must be null (exact) or an integer >= 1, got {task_subset!r}")
    name = option_name(surgery)
    if not surgery.allows_task_subset:
        raise ValueError(
            f"surgery.task_subset is for methods that re-weight the rows without state across steps "
            f"({', '.join(task_subset_methods())}); surgery={name} does not: set surgery.task_subset=null"
        )
    if surgery.space != "params":
        raise ValueError(
            "surgery.task_subset saves per-task passes through the encoder, which surgery.space=features "
            "does not take (its rows stop at the representation): use surgery.space=params or task_subset=null"
        )
    return task_subset


def task_subset_methods() -> list[str]:
    """The ``surgery=`` options of this package that allow ``task_subset`` (read from
    each class's :attr:`Surgery.allows_task_subset`, so the list cannot go stale)."""
    found: set[str] = set()
    pending: list[type[Surgery]] = [Surgery]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        package, _, name = cls.__module__.rpartition(".")
        if cls.allows_task_subset and package == __package__ and cls.__module__ != __name__:
            found.add(name)
    return sorted(found)


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
