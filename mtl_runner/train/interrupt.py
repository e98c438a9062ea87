"""Ctrl-C and pre-emption: stop at the next step boundary with a checkpoint, not mid-write.

During training (:meth:`StopRequests.active`), SIGINT (Ctrl-C) and SIGTERM (what SLURM and
most schedulers send before they pre-empt or cancel a job) only set a flag here; :class:`StopAtSafePoint`, the last callback of the
trainer, reads it after each training step, writes ``last.pt`` there and raises
:class:`RunInterrupted`, which the command line turns into one line with the command that
resumes the run (exit 130 or 143, the shell's codes for the two signals). A second signal
while the first is pending stops at once (``KeyboardInterrupt``): every file is replaced
atomically (:mod:`mtl_runner.io`), so the checkpoint on disk stays the previous, valid one.

Under ``trainer.strategy=ddp`` the ranks agree on the step: the flag is summed over the
group at every step boundary, so all ranks stop, and checkpoint, at the same step.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

import torch

from mtl_runner.train.state import StepOutcome
from mtl_runner.train.trainer import Callback, Trainer

__all__ = ["EXIT_CODES", "RunInterrupted", "StopAtSafePoint", "StopRequests"]

#: The exit code of a run stopped by each signal: 128 + its number, as a shell reports it.
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class RunInterrupted(Exception):
    """The run stopped at a step boundary on a signal, with its checkpoint written."""

    def __init__(self, signum: int, epoch: int, step: int, checkpointed: bool) -> None:
        self.signum = signum
        self.epoch = epoch
        self.step = step
        self.checkpointed = checkpointed
        super().__init__(f"{signal.Signals(signum).name} at epoch {epoch + 1}, step {step}")

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(signal.Signals(self.signum), 128 + self.signum)


class StopRequests:
    """The signal received during :meth:`active` training, if any (set from the
    handler, read at step boundaries). Outside it (baselines, evaluation, start-up) the
    default handling stays: Ctrl-C stops at once."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def handle(self, signum: int, frame: FrameType | None) -> None:
        del frame
        if self.signum is not None:
            raise KeyboardInterrupt  # the second signal: stop now
        self.signum = signum

    @contextmanager
    def active(self) -> Iterator[None]:
        """Route SIGINT and SIGTERM here for the duration (main thread only; elsewhere,
        e.g. a launcher's worker thread, the default handling stays). A signal the process
        was started ignoring stays ignored: a job started in the background (``nohup ... &``,
        a non-interactive shell's ``&``) was asked not to be stopped by the terminal's Ctrl-C."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.getsignal(sig) for sig in EXIT_CODES}
        for sig, handler in previous.items():
            if handler is not signal.SIG_IGN:
                signal.signal(sig, self.handle)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


class StopAtSafePoint(Callback):
    """After each training step (under ddp: each logged step, where all ranks agree): if a
    stop was requested (on any rank), save the checkpoint with ``save`` (the run's
    :meth:`Checkpointing.save <mtl_runner.train.callbacks.Checkpointing.save>`; none: the
    run keeps none) and raise :class:`RunInterrupted`. Goes last among the
    callbacks, so the step's curves and counters are complete in the checkpoint."""

    def __init__(self, requests: StopRequests, save: Callable[[Trainer], None] | None) -> None:
        self.requests = requests
        self.save = save

    def on_train_batch_end(self, trainer: Trainer, outcome: StepOutcome) -> None:
        signum = self.requests.signum or 0
        if trainer.distributed is not None:
            # The ranks agree on a stop where the step reads its flags back anyway (the
            # log interval), not with a collective and a host read on every step.
            if outcome.step % trainer.settings.log_every_n_steps:
                return
            flag = torch.tensor([float(signum)], device=trainer.device)
            trainer.distributed.sum_([flag])
            signum = int(flag.item()) and (self.requests.signum or int(signal.SIGTERM))
        if not signum:
            return
        if self.save is not None:
            self.save(trainer)
        raise RunInterrupted(signum, trainer.state.epoch, trainer.state.step, self.save is not None)

