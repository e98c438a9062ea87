"""Progress display: a rich bar on a terminal, one plain line per epoch otherwise
(log files and CI stay readable), or nothing."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress


class Progress:
    def __init__(self, mode: str, name: str, epochs: int, steps_per_epoch: int) -> None:
        self.console = Console(stderr=True)
        if mode == "auto":
            mode = "bar" if self.console.is_terminal else "lines"
        self.mode = mode
        self.name = name
        self.epochs = epochs
        self._bar: RichProgress | None = None
        self._task: Any = None
        self.total = epochs * steps_per_epoch

    def __enter__(self) -> Progress:
        if self.mode == "bar":
            self._bar = RichProgress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                console=self.console, transient=False,
            )
            self._bar.__enter__()
            self._task = self._bar.add_task(self.name, total=self.total, info="")
        return self

    def skip(self, steps: int) -> None:
        """Start the bar at ``steps`` (a resumed run)."""
        if self._bar is not None and steps:
            self._bar.update(self._task, completed=steps)

    def advance(self) -> None:
        if self._bar is not None:
            self._bar.advance(self._task)

    def epoch_done(self, record: dict[str, Any]) -> None:
        losses = " ".join(f"{k}={v:.4g}" for k, v in record["val_loss"].items())
        line = f"{self.name} epoch {record['epoch']}/{self.epochs}  val loss {losses}  ({record['seconds']:.1f}s)"
        if self._bar is not None:
            self._bar.update(self._task, info=f"epoch {record['epoch']}/{self.epochs}  val {losses}")
        elif self.mode == "lines":
            print(line, file=sys.stderr, flush=True)

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
