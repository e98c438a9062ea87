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

At the split every head gets its own detached copy of ``z`` (no copy of the data), so
one backward pass of the summed losses gives every task's row of ``z`` and its head's
gradients. Without a split, a per-task pass starts at the task's own loss (a gradient
edge of the ``torch.stack`` that made the loss vector), so it runs only its own head. A row-weighting
surgery (:class:`GramianWeighting`) runs on the unweighted ``J`` without ``T x P``
temporaries (see :meth:`GradientEngine._direction`); rows go straight into one
``(T, P)`` buffer and ``.grad`` gets views of the direction.

The balancer's weights scale the rows before surgery. No ``.item()`` or host transfer
happens here, except while ``auto`` times its two candidates on the first steps (and
one flag read from a CPU tensor, which waits for nothing).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from mtl_runner.models.sharing.base import SharingModel
from mtl_runner.optim.balancers.base import Balancer
from mtl_runner.optim.surgery.base import GramianWeighting, Surgery
from mtl_runner.train.distributed import DataParallel

Strategy = Literal["auto", "batched", "sequential"]
#: torch.autograd.grad takes gradient edges as outputs since torch 2.4.
_EDGES_AS_OUTPUTS = torch.__version__ >= "2.4"
if _EDGES_AS_OUTPUTS:
    from torch.autograd.graph import GradientEdge
else:  # pragma: no cover - older torch: per-task passes start from the stacked losses
    GradientEdge = tuple  # type: ignore[misc,assignment]
AUTO_TRIALS = 3  # timed steps per candidate before auto settles


@dataclass
class StepGradients:
    """What one step's backward produced, for diagnostics and logging.

    ``jacobian`` holds the unweighted per-task gradient rows (shared parameters, or the
    shared representation in the features space) when the step computed them.
    ``surgery_weights`` are the effective per-task weights the surgery applied, where
    the method defines them.
    """

    jacobian: Tensor | None = None
    surgery_weights: Tensor | None = None


class GradientEngine:
    def __init__(
        self,
        model: SharingModel,
        balancer: Balancer,
        surgery: Surgery,
        strategy: Strategy = "auto",
        distributed: DataParallel | None = None,
    ) -> None:
        """``distributed``: under ``trainer.strategy=ddp``, per-task rows, head gradients
        and fast-path gradients are averaged over ranks before the balancer and the
        surgery act (see :mod:`mtl_runner.train.distributed`)."""
        if strategy not in ("auto", "batched", "sequential"):
            raise ValueError(f"trainer.jacobian must be auto, batched or sequential, got {strategy!r}")
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
        self.distributed = distributed
        self._observed: Tensor | None = None
        self.refresh_parameters()
        if not self.shared:
            _refuse_without_shared(model, balancer, surgery)
        self.strategy: Strategy = strategy
        self._timings: dict[str, list[float]] = {"batched": [], "sequential": []}
        self._batched_ok = False
        self._features: tuple[Tensor, dict[str, Tensor]] | None = None
        self._loss_scale: float | None = None
        self._z: Tensor | None = None
        self.balancer_params = [p for p in balancer.parameters() if p.requires_grad]

    def refresh_parameters(self) -> None:
        """Re-read which parameters train (``requires_grad``): frozen ones get no gradient
        rows. Called again when fine-tuning unfreezes stages during a run."""
        model = self.model
        self.shared = [p for p in model.shared_parameters() if p.requires_grad]
        self.task_params = {t: [p for p in model.task_parameters(t) if p.requires_grad] for t in model.task_names}
        last_ids = {id(p) for p in model.last_shared_parameters()} if self.balancer.requires_grads == "last_shared" else set()
        self.last_shared = [p for p in self.shared if id(p) in last_ids]
        self._last_columns = _columns_of(self.shared, last_ids)

    def state_dict(self) -> dict[str, Any]:
        """The strategy ``auto`` settled on (and its timings), so a resumed run computes
        its Jacobians the same way as the run it continues."""
        return {"strategy": self.strategy, "timings": {k: list(v) for k, v in self._timings.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.strategy = state["strategy"]
        self._timings = {k: list(v) for k, v in state["timings"].items()}

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
        self._features = (z, leaves)
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
        the fast path would give. ``loss_scale`` (fp16 training): the model's gradients
        are taken of the scaled losses, so half-precision activation gradients do not
        underflow, and divided by the scale as soon as they exist, so the balancer, the
        surgery and ``.grad`` all see true gradients. ``observed``: the loss values the
        balancer and surgery read (under ddp the mean over ranks; default the losses).
        """
        self._loss_scale = loss_scale
        self._observed = losses.detach() if observed is None else observed
        w = weights.detach()
        self._balancer_backward(losses, weights)
        extra = self.model.penalty()
        wants_full = need_jacobian or self.surgery.needs_jacobian or self.balancer.requires_grads == "shared"
        if not self.shared:
            # Nothing shared (sharing=none/soft): per-task rows have zero columns, and only
            # a diagnostics step can ask for them (the constructor refused the rest).
            self._plain_backward(losses, w, extra)
            return StepGradients(jacobian=losses.new_zeros((losses.shape[0], 0)) if wants_full else None)
        if not wants_full:
            if self.balancer.requires_grads == "last_shared":
                rows = self._global_rows(self._rows(losses, self.last_shared, with_heads=False))[0]
                self.balancer.scale_rows(rows, self._observed, weights)
            self._plain_backward(losses, w, extra)
            return StepGradients()
        if self.features_space:
            return self._features_backward(losses, weights, extra)
        return self._params_backward(losses, weights, extra)

    def _balancer_backward(self, losses: Tensor, weights: Tensor) -> None:
        """Gradients of the balancer's own learnable parameters (uncertainty's s_t)."""
        if not self.balancer_params:
            return
        objective = (weights * self._observed).sum()
        reg = self.balancer.regularizer()
        if reg is not None:
            objective = objective + reg
        grads = torch.autograd.grad(objective, self.balancer_params, allow_unused=True)
        for p, g in zip(self.balancer_params, grads):
            if g is not None:
                p.grad = g if p.grad is None else p.grad + g

    def _plain_backward(self, losses: Tensor, w: Tensor, extra: Tensor | None) -> None:
        total = (w * losses).sum()
        if extra is not None:
            total = total + extra
        if self._loss_scale is not None:
            total = total * self._loss_scale
        total.backward()
        if self._features is not None:
            z, leaves = self._features
            self._features = None
            grads = [leaf.grad for leaf in leaves.values() if leaf.grad is not None]
            if grads:
                z.backward(torch.stack(grads).sum(0))
        if self._loss_scale is not None:
            self._unscale_grads(self.model.parameters())
        if self.distributed is not None:
            self.distributed.mean_grads_(self.model.parameters())

    def _unscale_grads(self, params: Any) -> None:
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            torch._foreach_div_(grads, self._loss_scale)

    def _params_backward(self, losses: Tensor, weights: Tensor, extra: Tensor | None) -> StepGradients:
        # Nothing backpropagates through the losses after the rows (the penalty, if any, is
        # its own graph, kept to be safe): the passes free the graph as they go.
        features, self._features = self._features, None
        rows = self._rows(losses, self.shared, with_heads=True, retain=extra is not None, through=features)
        jacobian, head_grads = self._global_rows(rows)
        direction = self._direction(jacobian, weights)
        if direction.untyped_storage().data_ptr() == jacobian.untyped_storage().data_ptr():
            direction = direction.clone()  # .grad gets views of it: never of the returned J
        _assign(self.shared, direction)
        self._assign_heads(head_grads, weights.detach())
        if extra is not None:
            extra.backward()
        return StepGradients(jacobian=jacobian, surgery_weights=self.surgery.last_weights)

    def _features_backward(self, losses: Tensor, weights: Tensor, extra: Tensor | None) -> StepGradients:
        assert self._features is not None
        z, leaves = self._features
        self._features = None
        self._z = z
        jacobian, head_grads = self._unscaled(*self._leaf_rows(losses, leaves))
        # Surgery.__init__ admits space=features only for GramianWeighting methods, whose
        # call is weights(rows @ rows.T) @ rows (dropping non-finite rows, setting last_weights).
        direction = self._direction(jacobian, weights)
        self._z = None
        self._assign_heads(head_grads, weights.detach())
        if self._loss_scale is not None:
            direction = direction * self._loss_scale
        z.backward(direction.view_as(z).to(z.dtype), retain_graph=extra is not None)
        if self._loss_scale is not None:
            self._unscale_grads(self.shared)
        if extra is not None:
            extra.backward()
        return StepGradients(jacobian=jacobian, surgery_weights=self.surgery.last_weights)

    def _global_rows(
        self, result: tuple[Tensor, list[list[Tensor | None]]]
    ) -> tuple[Tensor, list[list[Tensor | None]]]:
        """Under ddp, the rows and head gradients of the combined batch (mean over ranks
        of the share-scaled local ones), identical on every rank."""
        if self.distributed is not None:
            jacobian, head_grads = result
            self.distributed.mean_([jacobian, *(g for grads in head_grads for g in grads if g is not None)])
        return result

    def _direction(self, jacobian: Tensor, weights: Tensor) -> Tensor:
        """The surgery's direction from the unweighted rows ``J`` and the balancer's
        weights: what ``surgery(w[:, None] * J)`` returns. A row weighting gets ``w`` as
        its row scale (:meth:`GramianWeighting.direction`: no ``T x P`` temporaries), unless
        the balancer rewrites the rows itself. With weights of 1 (uniform) this is the same
        arithmetic, bit for bit; otherwise the products are rounded in another order
        (relative differences around 1e-7)."""
        requirement = self.balancer.requires_grads
        if requirement == "shared" or not isinstance(self.surgery, GramianWeighting):
            return self.surgery(self._scale(jacobian, weights), self._observed)
        if requirement == "last_shared":
            self._observe_last(jacobian, weights)
        row_scale = weights.detach().to(jacobian.dtype)
        return self.surgery.direction(jacobian, self._observed, row_scale, read_flags=jacobian.device.type == "cpu")

    def _scale(self, jacobian: Tensor, weights: Tensor) -> Tensor:
        """Rows as the surgery sees them; a "last_shared" balancer observes its layer's
        rows (a column subset of J, or in the features space a vector-Jacobian product
        of each representation row through the last stage only)."""
        requirement = self.balancer.requires_grads
        if requirement == "shared":
            return self.balancer.scale_rows(jacobian, self._observed, weights)
        if requirement == "last_shared":
            self._observe_last(jacobian, weights)
        return weights.detach().to(jacobian.dtype)[:, None] * jacobian

    def _observe_last(self, jacobian: Tensor, weights: Tensor) -> None:
        if self.features_space:
            assert self._z is not None
            last_rows = torch.stack(
                [
                    _flatten(torch.autograd.grad(self._z, self.last_shared, row.view_as(self._z), retain_graph=True, allow_unused=True), self.last_shared)
                    for row in jacobian
                ]
            )
        else:
            last_rows = jacobian[:, self._last_columns.to(jacobian.device)]
        self.balancer.scale_rows(last_rows, self._observed, weights)

    def _assign_heads(self, head_grads: list[list[Tensor | None]], w: Tensor) -> None:
        for t, (name, params) in enumerate(self.task_params.items()):
            for p, g in zip(params, head_grads[t]):
                if g is not None:
                    g = g * w[t]
                    p.grad = g if p.grad is None else p.grad + g

    # ------------------------------------------------------- per-task gradients
    def _rows(
        self,
        losses: Tensor,
        targets: list[Tensor],
        *,
        with_heads: bool,
        retain: bool = True,
        through: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, list[list[Tensor | None]]]:
        """Unweighted per-task gradients of ``targets`` as a ``(T, P)`` matrix, and each
        task's gradients of its own head parameters (when ``with_heads``). ``retain``:
        keep the graph for a later backward (else the passes free it as they go).

        ``through=(z, leaves)`` (the params-space split): the rows of the representation
        come from one pass through the heads (:meth:`_leaf_rows`) and are then carried
        through the encoder ``z -> targets`` (the part the strategy decides: one batched
        pass or ``T`` passes)."""
        strategy = self._choose()
        start = self._clock() if self.strategy == "auto" else None
        if through is None:
            result = self._task_rows(losses, targets, with_heads, retain, strategy, self._loss_scale)
        else:
            z, leaves = through
            z_rows, head_grads = self._leaf_rows(losses, leaves)
            result = (self._encoder_rows(z, z_rows, targets, retain, strategy), head_grads)
        if start is not None:
            self._timings[strategy].append(self._clock() - start)
        return self._unscaled(*result)

    def _unscaled(self, jacobian: Tensor, head_grads: list[list[Tensor | None]]) -> tuple[Tensor, list[list[Tensor | None]]]:
        """Rows and head gradients of the true losses (fp16 training scales them)."""
        scale = self._loss_scale
        if scale is not None:
            # Both are this step's own tensors: unscale in place.
            jacobian.div_(scale)
            for grads in head_grads:
                for g in grads:
                    if g is not None:
                        g.div_(scale)
        return jacobian, head_grads

    def _task_rows(
        self, losses: Tensor, targets: list[Tensor], with_heads: bool, retain: bool, strategy: str, scale: float | None
    ) -> tuple[Tensor, list[list[Tensor | None]]]:
        """The per-task passes from the losses. When ``losses`` is a ``torch.stack`` of the
        task losses, task ``t``'s pass starts at its own loss (a gradient edge of the
        stack), so it traverses only its own head: through the stacked vector every pass
        would also run the other heads' backward on zero gradients (``T^2`` head passes).
        Otherwise the strategy's way (one batched pass, or ``T`` passes)."""
        edges = _task_edges(losses)
        if edges is not None:
            return self._rows_sequential(edges, losses, targets, with_heads, retain, scale)
        if scale is not None:
            losses = losses * scale
        if strategy == "batched":
            try:
                # Until a batched pass has succeeded, keep the graph: a missing batching
                # rule fails halfway through, and the sequential retry needs it whole.
                result = self._rows_batched(losses, targets, with_heads, retain or not self._batched_ok)
                self._batched_ok = True
                return result
            except RuntimeError:
                # Some ops have no batching rule for vmap; sequential always works.
                self.strategy = "sequential"
        return self._rows_sequential(list(losses), losses, targets, with_heads, retain, None)

    def _leaf_rows(self, losses: Tensor, leaves: dict[str, Tensor]) -> tuple[Tensor, list[list[Tensor | None]]]:
        """Each task's gradient of its own copy of the representation (the rows, ``(T,
        z.numel())``) and of its head's parameters, from one backward pass of the summed
        losses: each copy and each head reaches only its own task's loss, so the sum
        separates them exactly, and the autograd engine runs once instead of ``T`` times."""
        names = list(self.task_params)
        heads = [self.task_params[name] for name in names]
        total = losses.sum() if self._loss_scale is None else losses.sum() * self._loss_scale
        grads = torch.autograd.grad(
            total, [leaves[name] for name in names] + [p for params in heads for p in params], allow_unused=True
        )
        z_rows = _empty_rows(len(names), [leaves[names[0]]])
        for t, g in enumerate(grads[: len(names)]):
            _write_row(z_rows[t], (g,), [leaves[names[t]]])
        head_grads, offset = [], len(names)
        for params in heads:
            head_grads.append(list(grads[offset : offset + len(params)]))
            offset += len(params)
        return z_rows, head_grads

    def _encoder_rows(self, z: Tensor, z_rows: Tensor, targets: list[Tensor], retain: bool, strategy: str) -> Tensor:
        """``J`` of ``targets`` from the rows of the representation: ``T`` vector-Jacobian
        products through the encoder, one batched pass or ``T`` passes."""
        num_tasks = z_rows.shape[0]
        cotangents = z_rows.view(num_tasks, *z.shape).to(z.dtype)
        jacobian = _empty_rows(num_tasks, targets)
        if strategy == "batched":
            try:
                grads = torch.autograd.grad(
                    z, targets, cotangents, retain_graph=retain or not self._batched_ok, is_grads_batched=True, allow_unused=True
                )
                self._batched_ok = True
                _write_row(jacobian, grads, targets)
                return jacobian
            except RuntimeError:
                self.strategy = "sequential"
        for t in range(num_tasks):
            grads = torch.autograd.grad(z, targets, cotangents[t], retain_graph=retain or t < num_tasks - 1, allow_unused=True)
            _write_row(jacobian[t], grads, targets)
        return jacobian

    def _choose(self) -> str:
        """``auto``: batched first (that call includes vmap's warm-up and is not compared),
        then the two take turns, so that a burst of load on a shared machine hits both,
        until each has :data:`AUTO_TRIALS` timed steps; the faster best time wins."""
        if self.strategy != "auto":
            return self.strategy
        batched, sequential = self._timings["batched"], self._timings["sequential"]
        if len(batched) + len(sequential) < 1 + 2 * AUTO_TRIALS:
            return "batched" if len(batched) <= len(sequential) else "sequential"
        self.strategy = "batched" if min(batched[1:]) <= min(sequential) else "sequential"
        return self.strategy

    def _clock(self) -> float:
        if self.shared and self.shared[0].is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _rows_sequential(
        self,
        outputs: list[Tensor] | list[GradientEdge | None],
        losses: Tensor,
        targets: list[Tensor],
        with_heads: bool,
        retain: bool,
        scale: float | None,
    ) -> tuple[Tensor, list[list[Tensor | None]]]:
        """One pass per task from ``outputs[t]`` (the scalar loss, or its gradient edge,
        seeded with ``scale``; None: the loss does not depend on anything trained)."""
        num_tasks = losses.shape[0]
        jacobian = _empty_rows(num_tasks, targets)
        seed = None if scale is None else torch.full((), scale, dtype=losses.dtype, device=losses.device)
        head_grads = []
        for t, name in enumerate(self.task_params):
            own = self.task_params[name] if with_heads else []
            output = outputs[t]
            if output is None:
                grads: tuple[Tensor | None, ...] = (None,) * (len(targets) + len(own))
            else:
                if isinstance(output, GradientEdge):
                    cotangent = seed if seed is not None else torch.ones((), dtype=losses.dtype, device=losses.device)
                else:
                    cotangent = None
                grads = torch.autograd.grad(
                    output, targets + own, cotangent, retain_graph=retain or t < num_tasks - 1, allow_unused=True
                )
            _write_row(jacobian[t], grads[: len(targets)], targets)
            head_grads.append(list(grads[len(targets) :]))
        return jacobian, head_grads

    def _rows_batched(
        self, losses: Tensor, targets: list[Tensor], with_heads: bool, retain: bool
    ) -> tuple[Tensor, list[list[Tensor | None]]]:
        num_tasks = losses.shape[0]
        heads = [p for params in self.task_params.values() for p in params] if with_heads else []
        eye = torch.eye(num_tasks, dtype=losses.dtype, device=losses.device)
        grads = torch.autograd.grad(
            losses, targets + heads, grad_outputs=eye, retain_graph=retain, is_grads_batched=True, allow_unused=True
        )
        jacobian = _empty_rows(num_tasks, targets)
        _write_row(jacobian, grads[: len(targets)], targets)
        head_grads: list[list[Tensor | None]] = []
        offset = len(targets)
        for t, params in enumerate(self.task_params.values()):
            if not with_heads:
                head_grads.append([])
                continue
            chunk = grads[offset : offset + len(params)]
            head_grads.append([None if g is None else g[t] for g in chunk])
            offset += len(params)
        return jacobian, head_grads


def _refuse_without_shared(model: SharingModel, balancer: Balancer, surgery: Surgery) -> None:
    """A model without shared parameters gives surgery and gradient-based balancers nothing
    to act on: refuse them (one line, before training) instead of silently doing nothing."""
    sharing = type(model).__module__.rsplit(".", 1)[-1]
    if surgery.needs_jacobian:
        name = type(surgery).__module__.rsplit(".", 1)[-1]
        raise ValueError(
            f"surgery={name} acts on shared parameters, but sharing={sharing} has none (each task has its own "
            "encoder): use surgery=none, or a sharing strategy with shared parameters (hard, cross_stitch, mtan, mmoe, film)"
        )
    if balancer.requires_grads is not None:
        name = type(balancer).__module__.rsplit(".", 1)[-1]
        raise ValueError(
            f"balancer={name} needs task gradients of shared parameters, but sharing={sharing} has none (each task has "
            "its own encoder): use a loss-based balancer (uniform, uncertainty, dwa, rlw, ...) or a sharing strategy "
            "with shared parameters"
        )


def _flatten(grads: tuple[Tensor | None, ...], params: list[Tensor]) -> Tensor:
    return torch.cat(
        [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)]
    )


def _assign(params: list[nn.Parameter], flat: Tensor) -> None:
    """Write a flat direction into the parameters' ``.grad`` (accumulating). ``flat`` is
    this step's own tensor: a parameter without a gradient gets a view of it, no copy."""
    offset = 0
    for p in params:
        n = p.numel()
        g = flat[offset : offset + n].view_as(p).to(p.dtype)
        p.grad = g if p.grad is None else p.grad + g
        offset += n


def _task_edges(losses: Tensor) -> list[GradientEdge | None] | None:
    """Each task's loss as a gradient edge, when ``losses`` is ``torch.stack`` of ``T``
    scalar losses (None in an edge: that loss does not require grad); else None."""
    node = losses.grad_fn
    if not _EDGES_AS_OUTPUTS or node is None or losses.dim() != 1 or type(node).__name__ != "StackBackward0":
        return None
    edges = node.next_functions
    if len(edges) != losses.shape[0]:
        return None
    return [None if fn is None else GradientEdge(fn, nr) for fn, nr in edges]


def _empty_rows(num_tasks: int, targets: list[Tensor]) -> Tensor:
    """The ``(T, P)`` buffer the rows are written into, in the targets' dtype, promoted
    to float32 from half precision (a features-space representation under autocast):
    surgery solves small systems from the rows' Gramian."""
    dtype = targets[0].dtype if targets else torch.float32
    if dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32
    device = targets[0].device if targets else None
    return torch.empty((num_tasks, sum(p.numel() for p in targets)), dtype=dtype, device=device)


def _write_row(out: Tensor, grads: tuple[Tensor | None, ...], params: list[Tensor]) -> None:
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


def _columns_of(params: list[nn.Parameter], ids: set[int]) -> Tensor:
    """Column indices in the flattened Jacobian of the parameters whose id is in ``ids``."""
    columns, offset = [], 0
    for p in params:
        if id(p) in ids:
            columns.append(torch.arange(offset, offset + p.numel()))
        offset += p.numel()
    return torch.cat(columns) if columns else torch.zeros(0, dtype=torch.long)
