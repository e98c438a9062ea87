"""How the Jacobian's per-task passes run (``trainer.jacobian``), and ``auto``'s timer.

``batched`` takes one vectorised backward over the ``T`` rows (``is_grads_batched``),
``sequential`` takes ``T`` passes; ``auto`` times both on the first steps and keeps the
faster. A batched pass can fail on an op without a batching rule for vmap: then the
choice becomes ``sequential`` for good (the failed step is retried sequentially).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch

Strategy = Literal["auto", "batched", "sequential"]
STRATEGIES: tuple[Strategy, ...] = ("auto", "batched", "sequential")
#: Timed steps per candidate before auto settles.
AUTO_TRIALS = 3


class StrategyChoice:
    """The strategy in force (``current``) and, under ``auto``, the timings it settles on."""

    def __init__(self, strategy: Strategy) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"trainer.jacobian must be auto, batched or sequential, got {strategy!r}")
        self.current: Strategy = strategy
        self.timings: dict[str, list[float]] = {"batched": [], "sequential": []}
        #: Until a batched pass has succeeded, it keeps the graph: a missing batching rule
        #: fails halfway through, and the sequential retry needs the graph whole.
        self.batched_proven = False

    def choose(self) -> Literal["batched", "sequential"]:
        """This step's strategy. ``auto``: batched first (that call includes vmap's warm-up
        and is not compared), then the two take turns, so that a burst of load on a shared
        machine hits both, until each has :data:`AUTO_TRIALS` timed steps; the faster best
        time wins and stays."""
        if self.current != "auto":
            return self.current
        batched, sequential = self.timings["batched"], self.timings["sequential"]
        if len(batched) + len(sequential) < 1 + 2 * AUTO_TRIALS:
            return "batched" if len(batched) <= len(sequential) else "sequential"
        self.current = "batched" if min(batched[1:]) <= min(sequential) else "sequential"
        return self.current

    @contextmanager
    def timed(self, strategy: str, on_cuda: bool) -> Iterator[None]:
        """Time the block as a trial of ``strategy`` while ``auto`` is still choosing (the
        device synchronised at both ends, so the time is the work's, not the launch's)."""
        if self.current != "auto":
            yield
            return
        start = _clock(on_cuda)
        yield
        self.timings[strategy].append(_clock(on_cuda) - start)

    def batched_failed(self) -> None:
        """A batched pass hit an op without a batching rule: sequential from now on."""
        self.current = "sequential"

    def state_dict(self) -> dict[str, Any]:
        """The strategy ``auto`` settled on (and its timings), so a resumed run computes
        its Jacobians the same way as the run it continues."""
        return {"strategy": self.current, "timings": {k: list(v) for k, v in self.timings.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.current = state["strategy"]
        self.timings = {k: list(v) for k, v in state["timings"].items()}


def _clock(on_cuda: bool) -> float:
    if on_cuda:
        torch.cuda.synchronize()
    return time.perf_counter()
