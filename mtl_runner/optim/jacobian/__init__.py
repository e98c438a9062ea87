"""The per-task gradient engine: one training step's backward pass.

Per step the engine decides how much gradient information it needs:

- nothing per task (``surgery=none``, no gradient-based balancer, no diagnostics step):
  one backward of ``sum_t w_t L_t``, the fast path;
- the per-task gradients of the last shared layer only (GradNorm with ``surgery=none``):
  ``T`` short backward passes that stop at that layer, then the fast path;
- the Jacobian ``J`` (``T x P``) of the shared parameters. With one shared
  representation ``z`` (``sharing=hard``) the forward splits at ``z`` as in the
  features space: one pass through the heads gives the rows of ``z``, and the
  encoder turns them into ``J`` in one vectorised backward over the ``T`` rows
  (``batched``, ``is_grads_batched``) or ``T`` passes (``sequential``), as torchjd's
  ``mtl_backward`` does; other models take ``T`` passes (or one batched pass) through
  the whole model. ``auto`` times both on the first such steps and keeps the faster.
  Task heads get their own task's weighted gradient from the same passes;
- in the features space (``surgery.space=features``): the gradients of the shared
  representation ``z`` per task (cheap: they stop at ``z``), the surgery's row weights
  from their ``T x T`` Gramian, then one weighted backward through the encoder.

A row-weighting surgery (:class:`~mtl_runner.optim.surgery.base.GramianWeighting`) runs
on the unweighted ``J`` without ``T x P`` temporaries; rows go straight into one
``(T, P)`` buffer and ``.grad`` gets views of the direction. The balancer's weights
scale the rows before surgery. No ``.item()`` or host transfer happens here, except
while ``auto`` times its two candidates on the first steps (and one flag read from a
CPU tensor, which waits for nothing).

The parts: :mod:`.engine` (:class:`GradientEngine`, which path serves a step),
:mod:`.paths` (one object per path), :mod:`.rows` (the per-task passes), :mod:`.strategy`
(``trainer.jacobian`` and ``auto``'s timer), :mod:`.context` (the per-step context, the
fp16 loss scale, :class:`StepGradients`). Under ddp the engine averages over ranks
through :class:`mtl_runner.optim.reduction.CrossRankReduction`.
"""

from mtl_runner.optim.jacobian.context import StepGradients
from mtl_runner.optim.jacobian.engine import GradientEngine
from mtl_runner.optim.jacobian.strategy import Strategy

__all__ = ["GradientEngine", "StepGradients", "Strategy"]
