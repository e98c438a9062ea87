"""Per-task gradient rows: the backward passes that compute them, and the ``(T, P)``
buffer they are written into.

A per-task pass starts at the task's own loss (a gradient edge of the ``torch.stack``
that made the loss vector), so it runs only its own head; through the stacked vector
every pass would also run the other heads' backward on zero gradients (``T^2`` head
passes). At a split of the forward (one detached copy of ``z`` per head) one backward
of the summed losses gives every task's row of ``z`` and its head's gradients, and the
encoder turns the rows into ``J`` (one batched pass or ``T`` passes, as the strategy
says).

With a task subset (``surgery.task_subset``, docs/methods.md#task-subsets) only the
sampled tasks' rows are computed, so the encoder is run ``k`` times instead of ``T``;
every head still gets its task's gradient (a pass that stops at the head, or the one
pass through the heads at a split).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mtl_runner.optim.jacobian.context import HeadGrads, LossScale, Split
from mtl_runner.optim.jacobian.strategy import StrategyChoice

#: torch.autograd.grad takes gradient edges as outputs since torch 2.4.
_EDGES_AS_OUTPUTS = torch.__version__ >= "2.4"
if _EDGES_AS_OUTPUTS:
    from torch.autograd.graph import GradientEdge
else:  # pragma: no cover - older torch: per-task passes start from the stacked losses
    GradientEdge = tuple  # type: ignore[misc,assignment]


class TaskRows:
    """The per-task passes over the trained parameters (``task_params``: each task's
    head, in task order), run the way ``choice`` says and timed for it."""

    def __init__(self, task_params: dict[str, list[nn.Parameter]], choice: StrategyChoice) -> None:
        self.task_params = task_params
        self.choice = choice

    def rows(
        self,
        losses: Tensor,
        targets: list[Tensor],
        scale: LossScale,
        *,
        with_heads: bool,
        retain: bool = True,
        through: Split | None = None,
        subset: Tensor | None = None,
    ) -> tuple[Tensor, HeadGrads]:
        """Unweighted per-task gradients of ``targets`` as a ``(T, P)`` matrix, and each
        task's gradients of its own head parameters (when ``with_heads``), of the true
        (unscaled) losses. ``retain``: keep the graph for a later backward (else the
        passes free it as they go). ``through``: the forward's split; the rows of the
        representation then come from one pass through the heads and are carried through
        the encoder ``z -> targets``. ``subset``: the tasks whose rows are computed (a
        CPU index tensor, increasing), the matrix then ``(k, P)`` in that order; the
        head gradients are every task's either way."""
        strategy = self.choice.choose()
        with self.choice.timed(strategy, on_cuda=bool(targets) and targets[0].is_cuda):
            if through is None:
                result = self._from_losses(losses, targets, with_heads, retain, strategy, scale, subset)
            else:
                z, leaves = through
                z_rows, head_grads = self.leaf_rows(losses, leaves, scale)
                if subset is not None:
                    z_rows = z_rows[subset.to(z_rows.device)]
                result = (self._through_encoder(z, z_rows, targets, retain, strategy), head_grads)
        return scale.unscale_rows_(*result)

    def leaf_rows(self, losses: Tensor, leaves: dict[str, Tensor], scale: LossScale) -> tuple[Tensor, HeadGrads]:
        """Each task's gradient of its own copy of the representation (the rows, ``(T,
        z.numel())``) and of its head's parameters, from one backward pass of the summed
        (scaled) losses: each copy and each head reaches only its own task's loss, so the
        sum separates them exactly, and the autograd engine runs once instead of ``T``
        times."""
        names = list(self.task_params)
        heads = [self.task_params[name] for name in names]
        grads = torch.autograd.grad(
            scale.scaled(losses.sum()), [leaves[name] for name in names] + [p for params in heads for p in params], allow_unused=True
        )
        # One stack, not T row copies: at T = 40 the per-copy overhead was a visible share.
        z_rows = torch.stack(
            [torch.zeros_like(leaves[name]) if g is None else g for name, g in zip(names, grads[: len(names)])]
        ).view(len(names), -1)
        z_rows = z_rows.to(rows_dtype(z_rows.dtype))
        head_grads, offset = [], len(names)
        for params in heads:
            head_grads.append(list(grads[offset : offset + len(params)]))
            offset += len(params)
        return z_rows, head_grads

    def _from_losses(
        self,
        losses: Tensor,
        targets: list[Tensor],
        with_heads: bool,
        retain: bool,
        strategy: str,
        scale: LossScale,
        subset: Tensor | None,
    ) -> tuple[Tensor, HeadGrads]:
        """From each task's own loss (its gradient edge) when ``losses`` is a stack of
        them; otherwise the strategy's way from the loss vector (with a subset, per-task
        passes: the batched pass's identity cotangents would cover every task)."""
        edges = task_edges(losses)
        if edges is not None:
            return self._sequential(edges, losses, targets, with_heads, retain, scale, subset)
        losses = scale.scaled(losses)
        if strategy == "batched" and subset is None:
            try:
                result = self._batched(losses, targets, with_heads, retain or not self.choice.batched_proven)
                self.choice.batched_proven = True
                return result
            except RuntimeError:  # an op without a batching rule for vmap
                self.choice.batched_failed()
        return self._sequential(list(losses), losses, targets, with_heads, retain, LossScale(), subset)

    def _through_encoder(self, z: Tensor, z_rows: Tensor, targets: list[Tensor], retain: bool, strategy: str) -> Tensor:
        """``J`` of ``targets`` from the rows of the representation: ``T`` vector-Jacobian
        products through the encoder, one batched pass or ``T`` passes."""
        num_tasks = z_rows.shape[0]
        cotangents = z_rows.view(num_tasks, *z.shape).to(z.dtype)
        jacobian = empty_rows(num_tasks, targets)
        if strategy == "batched":
            try:
                grads = torch.autograd.grad(
                    z, targets, cotangents, retain_graph=retain or not self.choice.batched_proven, is_grads_batched=True, allow_unused=True
                )
                self.choice.batched_proven = True
                write_rows(jacobian, grads, targets)
                return jacobian
            except RuntimeError:
                self.choice.batched_failed()
        for t in range(num_tasks):
            grads = torch.autograd.grad(z, targets, cotangents[t], retain_graph=retain or t < num_tasks - 1, allow_unused=True)
            write_rows(jacobian[t], grads, targets)
        return jacobian

    def _sequential(
        self,
        outputs: list[Tensor] | list[GradientEdge | None],
        losses: Tensor,
        targets: list[Tensor],
        with_heads: bool,
        retain: bool,
        scale: LossScale,
        subset: Tensor | None = None,
    ) -> tuple[Tensor, HeadGrads]:
        """One pass per task from ``outputs[t]`` (the scalar loss, or its gradient edge,
        seeded with the scale; None: the loss does not depend on anything trained). A
        task outside ``subset`` gets a pass to its head parameters only, which autograd
        prunes to the head: it never reaches the encoder."""
        num_tasks = losses.shape[0]
        sampled = None if subset is None else set(subset.tolist())
        jacobian = empty_rows(num_tasks if subset is None else subset.numel(), targets)
        seed = scale.seed(losses)
        head_grads = []
        row = 0
        for t, name in enumerate(self.task_params):
            own = self.task_params[name] if with_heads else []
            shared = targets if sampled is None or t in sampled else []
            output = outputs[t]
            if output is None or not shared + own:
                grads: tuple[Tensor | None, ...] = (None,) * (len(shared) + len(own))
            else:
                if isinstance(output, GradientEdge):
                    cotangent = seed if seed is not None else torch.ones((), dtype=losses.dtype, device=losses.device)
                else:
                    cotangent = None
                grads = torch.autograd.grad(
                    output, shared + own, cotangent, retain_graph=retain or t < num_tasks - 1, allow_unused=True
                )
            if shared:
                write_rows(jacobian[row], grads[: len(shared)], shared)
                row += 1
            head_grads.append(list(grads[len(shared) :]))
        return jacobian, head_grads

    def _batched(self, losses: Tensor, targets: list[Tensor], with_heads: bool, retain: bool) -> tuple[Tensor, HeadGrads]:
        num_tasks = losses.shape[0]
        heads = [p for params in self.task_params.values() for p in params] if with_heads else []
        eye = torch.eye(num_tasks, dtype=losses.dtype, device=losses.device)
        grads = torch.autograd.grad(
            losses, targets + heads, grad_outputs=eye, retain_graph=retain, is_grads_batched=True, allow_unused=True
        )
        jacobian = empty_rows(num_tasks, targets)
        write_rows(jacobian, grads[: len(targets)], targets)
        head_grads: HeadGrads = []
        offset = len(targets)
        for t, params in enumerate(self.task_params.values()):
            if not with_heads:
                head_grads.append([])
                continue
            chunk = grads[offset : offset + len(params)]
            head_grads.append([None if g is None else g[t] for g in chunk])
            offset += len(params)
        return jacobian, head_grads


def task_edges(losses: Tensor) -> list[GradientEdge | None] | None:
    """Each task's loss as a gradient edge, when ``losses`` is ``torch.stack`` of ``T``
    scalar losses (None in an edge: that loss does not require grad); else None."""
    node = losses.grad_fn
    if not _EDGES_AS_OUTPUTS or node is None or losses.dim() != 1 or type(node).__name__ != "StackBackward0":
        return None
    edges = node.next_functions
    if len(edges) != losses.shape[0]:
        return None
    return [None if fn is None else GradientEdge(fn, nr) for fn, nr in edges]


def empty_rows(num_tasks: int, targets: list[Tensor]) -> Tensor:
    """The ``(T, P)`` buffer the rows are written into, in the targets' dtype, promoted
    to float32 from half precision (a features-space representation under autocast):
    surgery solves small systems from the rows' Gramian."""
    dtype = rows_dtype(targets[0].dtype if targets else torch.float32)
    device = targets[0].device if targets else None
    return torch.empty((num_tasks, sum(p.numel() for p in targets)), dtype=dtype, device=device)


def rows_dtype(dtype: torch.dtype) -> torch.dtype:
    """The rows' dtype for gradients of ``dtype``: float32 from half precision."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def write_rows(out: Tensor, grads: tuple[Tensor | None, ...], params: list[Tensor]) -> None:
    """Copy gradients (a missing one is zero) into ``out``, one row ``(P,)`` or a batch of
    rows ``(T, P)`` (``is_grads_batched`` gradients), in ``params``' order."""
    lead = out.shape[:-1]
    offset = 0
    for g, p in zip(grads, params):
        n = p.numel()
        block = out[..., offset : offset + n]
        if g is None:
            block.zero_()
        else:
            block.copy_(g.reshape(*lead, n))
        offset += n


def flatten(grads: tuple[Tensor | None, ...], params: list[Tensor]) -> Tensor:
    """One flat row from per-parameter gradients (a missing one is zero)."""
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def columns_of(params: list[nn.Parameter], ids: set[int]) -> Tensor:
    """Column indices in the flattened Jacobian of the parameters whose id is in ``ids``."""
    columns, offset = [], 0
    for p in params:
        if id(p) in ids:
            columns.append(torch.arange(offset, offset + p.numel()))
        offset += p.numel()
    return torch.cat(columns) if columns else torch.zeros(0, dtype=torch.long)
