"""The engine's gradient paths, one object per way a step's gradients are made:

- :class:`PlainPath`: one backward of ``sum_t w_t L_t`` (nothing per task is needed);
- :class:`LastSharedPath`: a balancer that reads the per-task gradients of the last
  shared layer (GradNorm with ``surgery=none``) gets them, then the plain path;
- :class:`ParamsPath`: the Jacobian ``J`` of the shared parameters (or, with
  ``surgery.task_subset``, the rows of this step's sampled tasks), the surgery's
  direction from it, heads their own task's weighted gradient;
- :class:`FeaturesPath`: the per-task gradients of the shared representation ``z``, the
  surgery's row weights from their Gramian, then one weighted backward through the
  encoder (``surgery.space=features``).

Each takes the step's :class:`~mtl_runner.optim.jacobian.context.StepContext` and the
model's penalty (``extra``, its own graph, backpropagated last), fills ``.grad`` and
returns what the step produced.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mtl_runner.models.sharing.base import SharingModel
from mtl_runner.optim.balancers.base import Balancer
from mtl_runner.optim.jacobian.context import HeadGrads, StepContext, StepGradients
from mtl_runner.optim.jacobian.rows import TaskRows, columns_of, flatten
from mtl_runner.optim.reduction import CrossRankReduction
from mtl_runner.optim.surgery.base import GramianWeighting, Surgery


@dataclass(frozen=True)
class TrainedParameters:
    """The parameters that train (``requires_grad``) as the paths see them: frozen ones
    get no gradient rows. Rebuilt when fine-tuning unfreezes stages during a run."""

    shared: list[nn.Parameter]
    task_params: dict[str, list[nn.Parameter]]
    #: The last shared layer's parameters, for a "last_shared" balancer (else empty),
    #: and their columns in the flattened ``J``.
    last_shared: list[nn.Parameter]
    last_columns: Tensor

    @classmethod
    def of(cls, model: SharingModel, balancer: Balancer) -> TrainedParameters:
        shared = [p for p in model.shared_parameters() if p.requires_grad]
        last_ids = {id(p) for p in model.last_shared_parameters()} if balancer.requires_grads == "last_shared" else set()
        return cls(
            shared=shared,
            task_params={t: [p for p in model.task_parameters(t) if p.requires_grad] for t in model.task_names},
            last_shared=[p for p in shared if id(p) in last_ids],
            last_columns=columns_of(shared, last_ids),
        )


class PlainPath:
    def __init__(self, model: SharingModel, reduction: CrossRankReduction | None) -> None:
        self.model = model
        self.reduction = reduction

    def backward(self, ctx: StepContext, extra: Tensor | None) -> None:
        total = (ctx.w * ctx.losses).sum()
        if extra is not None:
            total = total + extra
        ctx.scale.scaled(total).backward()
        if ctx.split is not None:
            z, leaves = ctx.split
            grads = [leaf.grad for leaf in leaves.values() if leaf.grad is not None]
            if grads:
                z.backward(torch.stack(grads).sum(0))
        ctx.scale.unscale_grads_(self.model.parameters())
        if self.reduction is not None:
            self.reduction.mean_grads_(self.model.parameters())


class LastSharedPath:
    def __init__(
        self, plain: PlainPath, rows: TaskRows, params: TrainedParameters, balancer: Balancer, reduction: CrossRankReduction | None
    ) -> None:
        self.plain = plain
        self.rows = rows
        self.params = params
        self.balancer = balancer
        self.reduction = reduction

    def backward(self, ctx: StepContext, extra: Tensor | None) -> None:
        rows = self.rows.rows(ctx.losses, self.params.last_shared, ctx.scale, with_heads=False)
        jacobian, _ = mean_over_ranks(self.reduction, *rows)
        self.balancer.scale_rows(jacobian, ctx.observed, ctx.weights)
        self.plain.backward(ctx, extra)


class Direction:
    """The surgery's direction from the unweighted rows ``J`` and the balancer's weights:
    what ``surgery(w[:, None] * J)`` returns. A row weighting gets ``w`` as its row scale
    (:meth:`GramianWeighting.direction`: no ``T x P`` temporaries), unless the balancer
    rewrites the rows itself. With weights of 1 (uniform) this is the same arithmetic,
    bit for bit; otherwise the products are rounded in another order (relative
    differences around 1e-7). A "last_shared" balancer observes its layer's rows,
    which ``last_rows(J)`` gives (the path knows how)."""

    def __init__(self, balancer: Balancer, surgery: Surgery) -> None:
        self.balancer = balancer
        self.surgery = surgery

    def __call__(
        self, ctx: StepContext, jacobian: Tensor, last_rows: Callable[[Tensor], Tensor], subset: Tensor | None = None
    ) -> Tensor:
        """``subset``: the step's sampled tasks, whose rows ``jacobian`` holds (the engine
        admits a subset only for a row weighting and a balancer that reads no rows)."""
        if subset is not None:
            assert isinstance(self.surgery, GramianWeighting) and self.balancer.requires_grads is None
            return self.surgery.sampled_direction(
                jacobian, subset, ctx.w.shape[0], ctx.observed, ctx.w.to(jacobian.dtype), read_flags=jacobian.device.type == "cpu"
            )
        requirement = self.balancer.requires_grads
        if requirement == "shared":
            return self.surgery(self.balancer.scale_rows(jacobian, ctx.observed, ctx.weights), ctx.observed)
        if requirement == "last_shared":
            self.balancer.scale_rows(last_rows(jacobian), ctx.observed, ctx.weights)
        row_scale = ctx.w.to(jacobian.dtype)
        if not isinstance(self.surgery, GramianWeighting):
            return self.surgery(row_scale[:, None] * jacobian, ctx.observed)
        return self.surgery.direction(jacobian, ctx.observed, row_scale, read_flags=jacobian.device.type == "cpu")


class ParamsPath:
    def __init__(
        self, rows: TaskRows, params: TrainedParameters, direction: Direction, reduction: CrossRankReduction | None
    ) -> None:
        self.rows = rows
        self.params = params
        self.direction = direction
        self.reduction = reduction

    def backward(self, ctx: StepContext, extra: Tensor | None) -> StepGradients:
        """``ctx.all_rows``: the step's callbacks read every task's row (a diagnostics step).
        With a task subset the rows of all tasks are then computed and the direction
        still comes from the sampled ones, so that what a run learns does not depend on
        when its diagnostics look; on the other steps only the sampled rows exist, and
        the result carries no Jacobian."""
        num_tasks = ctx.losses.shape[0]
        subset = self.direction.surgery.sample_tasks(num_tasks)
        # Nothing backpropagates through the losses after the rows (the penalty, if any, is
        # its own graph, kept to be safe): the passes free the graph as they go.
        rows = self.rows.rows(
            ctx.losses, self.params.shared, ctx.scale, with_heads=True, retain=extra is not None, through=ctx.split,
            subset=None if ctx.all_rows else subset,
        )
        jacobian, head_grads = mean_over_ranks(self.reduction, *rows)
        sampled = jacobian if subset is None or not ctx.all_rows else jacobian[subset.to(jacobian.device)]
        direction = self.direction(ctx, sampled, self._last_rows, subset)
        if direction.untyped_storage().data_ptr() == jacobian.untyped_storage().data_ptr():
            direction = direction.clone()  # .grad gets views of it: never of the returned J
        assign(self.params.shared, direction)
        assign_heads(self.params.task_params, head_grads, ctx.w)
        if extra is not None:
            extra.backward()
        full = jacobian if subset is None or ctx.all_rows else None
        return StepGradients(jacobian=full, surgery_weights=self.direction.surgery.last_weights)

    def _last_rows(self, jacobian: Tensor) -> Tensor:
        return jacobian[:, self.params.last_columns.to(jacobian.device)]


class FeaturesPath:
    def __init__(self, rows: TaskRows, params: TrainedParameters, direction: Direction) -> None:
        self.rows = rows
        self.params = params
        self.direction = direction

    def backward(self, ctx: StepContext, extra: Tensor | None) -> StepGradients:
        assert ctx.split is not None, "the features space splits every forward"
        z, leaves = ctx.split
        jacobian, head_grads = ctx.scale.unscale_rows_(*self.rows.leaf_rows(ctx.losses, leaves, ctx.scale))
        # Surgery.__init__ admits space=features only for GramianWeighting methods, whose
        # call is weights(rows @ rows.T) @ rows (dropping non-finite rows, setting last_weights).
        direction = self.direction(ctx, jacobian, lambda rows: self._last_rows(z, rows))
        assign_heads(self.params.task_params, head_grads, ctx.w)
        z.backward(ctx.scale.scaled(direction).view_as(z).to(z.dtype), retain_graph=extra is not None)
        ctx.scale.unscale_grads_(self.params.shared)
        if extra is not None:
            extra.backward()
        return StepGradients(jacobian=jacobian, surgery_weights=self.direction.surgery.last_weights)

    def _last_rows(self, z: Tensor, rows: Tensor) -> Tensor:
        """The last shared layer's rows: each representation row carried through the last
        stage only (a vector-Jacobian product)."""
        last = self.params.last_shared
        return torch.stack(
            [flatten(torch.autograd.grad(z, last, row.view_as(z), retain_graph=True, allow_unused=True), last) for row in rows]
        )


def mean_over_ranks(reduction: CrossRankReduction | None, jacobian: Tensor, head_grads: HeadGrads) -> tuple[Tensor, HeadGrads]:
    """Under ddp, the rows and head gradients of the combined batch (mean over ranks of
    the share-scaled local ones), identical on every rank."""
    if reduction is not None:
        reduction.mean_([jacobian, *(g for grads in head_grads for g in grads if g is not None)])
    return jacobian, head_grads


def assign(params: list[nn.Parameter], flat: Tensor) -> None:
    """Write a flat direction into the parameters' ``.grad`` (accumulating). ``flat`` is
    this step's own tensor: a parameter without a gradient gets a view of it, no copy."""
    offset = 0
    for p in params:
        n = p.numel()
        g = flat[offset : offset + n].view_as(p).to(p.dtype)
        p.grad = g if p.grad is None else p.grad + g
        offset += n


def assign_heads(task_params: dict[str, list[nn.Parameter]], head_grads: HeadGrads, w: Tensor) -> None:
    """Each head's own task's gradient, weighted by the task's weight, into ``.grad``."""
    for t, params in enumerate(task_params.values()):
        for p, g in zip(params, head_grads[t]):
            if g is not None:
                g = g * w[t]
                p.grad = g if p.grad is None else p.grad + g
