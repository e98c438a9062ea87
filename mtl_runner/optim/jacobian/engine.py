"""The engine itself: which gradient path serves a step, and what ties the paths to the
model (the forward's split, the trained parameters, the balancer's own parameters)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mtl_runner.errors import option_name
from mtl_runner.models.sharing.base import SharingModel
from mtl_runner.optim.balancers.base import Balancer
from mtl_runner.optim.jacobian.context import LossScale, Split, StepContext, StepGradients
from mtl_runner.optim.jacobian.paths import (
    Direction,
    FeaturesPath,
    LastSharedPath,
    ParamsPath,
    PlainPath,
    TrainedParameters,
)
from mtl_runner.optim.jacobian.rows import TaskRows
from mtl_runner.optim.jacobian.strategy import Strategy, StrategyChoice
from mtl_runner.optim.reduction import CrossRankReduction
from mtl_runner.optim.surgery.base import Surgery


class GradientEngine:
    def __init__(
        self,
        model: SharingModel,
        balancer: Balancer,
        surgery: Surgery,
        strategy: Strategy,
        distributed: CrossRankReduction | None = None,
    ) -> None:
        """``strategy``: ``trainer.jacobian`` (see :mod:`.strategy`). ``distributed``: under
        ``trainer.strategy=ddp``, per-task rows, head gradients and fast-path gradients
        are averaged over ranks before the balancer and the surgery act (see
        :mod:`mtl_runner.train.distributed`)."""
        self.choice = StrategyChoice(strategy)
        self.model = model
        self.balancer = balancer
        self.surgery = surgery
        self.features_space = surgery.space == "features"
        if self.features_space and not model.supports_features_space:
            raise ValueError(
                f"surgery.space=features needs a sharing strategy with one shared representation "
                f"(sharing=hard); {type(model).__name__} has none: use surgery.space=params"
            )
        if distributed is not None and self.features_space:
            raise ValueError("surgery.space=features is not supported with trainer.strategy=ddp yet: use surgery.space=params")
        check_task_subset(balancer, surgery)
        self.distributed = distributed
        self.balancer_params = [p for p in balancer.parameters() if p.requires_grad]
        #: Set by :meth:`forward` when it split at the shared representation, taken by the
        #: next :meth:`backward`: the one piece of a step that spans two calls.
        self._split: Split | None = None
        self.refresh_parameters()
        if not self.shared:
            _refuse_without_shared(model, balancer, surgery)

    def refresh_parameters(self) -> None:
        """Re-read which parameters train (``requires_grad``): frozen ones get no gradient
        rows. Called again when fine-tuning unfreezes stages during a run."""
        params = TrainedParameters.of(self.model, self.balancer)
        self.shared = params.shared
        self.task_params = params.task_params
        rows = TaskRows(params.task_params, self.choice)
        direction = Direction(self.balancer, self.surgery)
        self._plain = PlainPath(self.model, self.distributed)
        self._last_shared = LastSharedPath(self._plain, rows, params, self.balancer, self.distributed)
        self._full = FeaturesPath(rows, params, direction) if self.features_space else ParamsPath(rows, params, direction, self.distributed)

    @property
    def strategy(self) -> Strategy:
        """The Jacobian strategy in force (``auto`` until it has settled)."""
        return self.choice.current

    def state_dict(self) -> dict[str, Any]:
        return self.choice.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.choice.load_state_dict(state)

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """The model's forward; in the features space ``z`` is detached so that per-task
        gradients stop there. In the params space the same split serves a model with one
        shared representation whenever the step will need the Jacobian: the pass through
        the heads stops at ``z``, and the encoder (one pass batched over the ``T`` rows,
        or ``T`` passes) gives ``J``, as torchjd's ``mtl_backward`` does."""
        if not (self.features_space or self._splits_params()):
            return self.model(x)
        z = self.model.encode(x)
        # One detached copy per head (sharing z's storage): each reaches only its own
        # task's loss, so one backward pass of the summed losses gives every row.
        leaves = {name: z.detach().requires_grad_(True) for name in self.model.task_names}
        self._split = (z, leaves)
        return self.model.decode(leaves)

    def _splits_params(self) -> bool:
        return (
            self.model.supports_features_space
            and bool(self.shared)
            and (self.surgery.needs_jacobian or self.balancer.requires_grads == "shared")
        )

    # ----------------------------------------------------------------- backward
    def backward(
        self,
        losses: Tensor,
        weights: Tensor,
        *,
        need_jacobian: bool = False,
        loss_scale: float | None = None,
        observed: Tensor | None = None,
    ) -> StepGradients:
        """Fill ``.grad`` of the model's (and the balancer's) parameters for this step.

        ``need_jacobian`` asks for per-task gradients even when neither the surgery nor
        the balancer needs them (a diagnostics step); the direction is then the same sum
        the fast path would give. ``loss_scale``: fp16 training's scale (see
        :class:`~.context.LossScale`). ``observed``: the loss values the balancer and
        surgery read (under ddp the mean over ranks; default the losses).
        """
        ctx = StepContext(
            losses=losses,
            weights=weights,
            observed=losses.detach() if observed is None else observed,
            scale=LossScale(loss_scale),
            split=self._split,
            all_rows=need_jacobian,
        )
        self._split = None
        self._balancer_backward(ctx)
        extra = self.model.penalty()
        wants_full = need_jacobian or self.surgery.needs_jacobian or self.balancer.requires_grads == "shared"
        if not self.shared:
            # Nothing shared (sharing=none/soft): per-task rows have zero columns, and only
            # a diagnostics step can ask for them (the constructor refused the rest).
            self._plain.backward(ctx, extra)
            return StepGradients(jacobian=losses.new_zeros((losses.shape[0], 0)) if wants_full else None)
        if wants_full:
            return self._full.backward(ctx, extra)
        if self.balancer.requires_grads == "last_shared":
            self._last_shared.backward(ctx, extra)
        else:
            self._plain.backward(ctx, extra)
        return StepGradients()

    def _balancer_backward(self, ctx: StepContext) -> None:
        """Gradients of the balancer's own learnable parameters (uncertainty's s_t)."""
        if not self.balancer_params:
            return
        objective = (ctx.weights * ctx.observed).sum()
        reg = self.balancer.regularizer()
        if reg is not None:
            objective = objective + reg
        grads = torch.autograd.grad(objective, self.balancer_params, allow_unused=True)
        for p, g in zip(self.balancer_params, grads):
            if g is not None:
                p.grad = g if p.grad is None else p.grad + g


def check_task_subset(balancer: Balancer, surgery: Surgery) -> None:
    """A task subset computes the rows of a few tasks per step: a balancer that reads every
    task's rows (``requires_grads``) cannot have them. Preflight calls this too, so the
    line comes before a run directory exists."""
    if surgery.task_subset is not None and balancer.requires_grads is not None:
        name = option_name(balancer)
        raise ValueError(
            f"surgery.task_subset computes the rows of a few tasks per step, but balancer={name} reads every "
            "task's gradient rows: use a loss-based balancer (uniform, uncertainty, dwa, rlw, ...) or task_subset=null"
        )


def _refuse_without_shared(model: SharingModel, balancer: Balancer, surgery: Surgery) -> None:
    """A model without shared parameters gives surgery and gradient-based balancers nothing
    to act on: refuse them (one line, before training) instead of silently doing nothing."""
    sharing = option_name(model)
    if surgery.needs_jacobian:
        name = option_name(surgery)
        raise ValueError(
            f"surgery={name} acts on shared parameters, but sharing={sharing} has none (each task has its own "
            "encoder): use surgery=none, or a sharing strategy with shared parameters (hard, cross_stitch, mtan, mmoe, film)"
        )
    if balancer.requires_grads is not None:
        name = option_name(balancer)
        raise ValueError(
            f"balancer={name} needs task gradients of shared parameters, but sharing={sharing} has none (each task has "
            "its own encoder): use a loss-based balancer (uniform, uncertainty, dwa, rlw, ...) or a sharing strategy "
            "with shared parameters"
        )
