"""Tasks as data: what a dataset declares and the trainer consumes.

A :class:`Task` names a prediction problem, its kind (which picks the head and the
metrics), its loss and its metrics with their direction. Nothing in the trainer is
specific to a dataset: it loops over ``TaskSet`` and calls these objects.

Metrics accumulate on the model's device (confusion matrices, sums, histograms) and are
read back once per evaluation, so evaluation never synchronises per batch.

Missing labels: a class target of :data:`IGNORE_INDEX` or a NaN float target marks an
example (or a label of a multilabel task) as unlabelled (depth: 0, normals: a zero vector).
Every kind's loss is the mean over the labelled entries of the batch (0, with a zero
gradient, when a batch has none) and its metrics skip them; both are computed with masks,
never with a host-side test. :func:`loss_terms` gives the sum and the count behind that
mean, so an evaluation can take the exact mean over a whole split.

A task may add metrics of its own (:class:`~mtl_runner.task_targets.UserMetric`, by
``_target_``); they see the labelled :func:`entries` of several batches at once
(:data:`PENDING_BYTES`), so that a selection's host sync is not paid per batch.

Why this module is long: each kind's labelled mask, loss and metric
accumulator are defined together here, so a kind's definitions cannot drift apart.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from mtl_runner.scores import BinaryAccumulator, MultilabelAccumulator
from mtl_runner.spans import ChunkCounter
from mtl_runner.task_targets import UserMetric

__all__ = [
    "Task", "TaskKind", "Metric", "MetricAccumulator", "task_loss", "loss_terms", "entries",
    "METRICS", "AVAILABLE_METRICS", "ACCUMULATORS", "DENSE_KINDS", "REGRESSION_KINDS", "TOKEN_KINDS", "IGNORE_INDEX",
]

TaskKind = Literal["segmentation", "depth", "normals", "classification", "regression", "binary", "multilabel", "tagging", "spans"]
#: One label per token of a ``(B, L)`` sequence: token accuracy, or chunk F1 for BIO-style tags.
TOKEN_KINDS: frozenset[str] = frozenset({"tagging", "spans"})
DENSE_KINDS: frozenset[str] = frozenset({"segmentation", "depth", "normals"})
REGRESSION_KINDS: frozenset[str] = frozenset({"depth", "normals", "regression"})
IGNORE_INDEX = -1


@dataclass(frozen=True)
class Metric:
    name: str
    higher_is_better: bool


class MetricAccumulator(Protocol):
    def update(self, pred: Tensor, target: Tensor) -> None: ...
    def compute(self) -> dict[str, float]: ...


@dataclass(frozen=True)
class Task:
    """One task of a dataset.

    ``num_outputs`` is the number of classes (classification kinds), output channels
    (regression kinds), 1 (binary) or the number of labels (multilabel). ``auxiliary``
    tasks are trained and logged but excluded from Δm. ``loss_name`` selects the loss among
    those defined for the kind (see :func:`task_loss`). ``metric_names`` chooses which of
    the kind's metrics (:data:`AVAILABLE_METRICS`) are reported and enter Δm; empty means
    the kind's defaults (:data:`METRICS`). ``user_metrics`` come after those, with their own
    directions; their names must differ from the kind's metrics. ``loss_fn`` replaces the
    kind's loss with any callable ``(pred, target) -> per-entry losses`` (see :func:`task_loss`).
    """

    name: str
    kind: TaskKind
    num_outputs: int
    loss_name: str = "default"
    auxiliary: bool = False
    class_names: tuple[str, ...] = field(default=())
    metric_names: tuple[str, ...] = field(default=())
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = field(default=None, compare=False)
    user_metrics: tuple[UserMetric, ...] = field(default=(), compare=False)

    def spec(self) -> dict[str, Any]:
        """The task as JSON data, from which ``Task(**spec)`` rebuilds its head's shape (a
        baseline's record). Callables (its own loss and metrics) are configuration, not data."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self) if f.compare}

    @property
    def is_dense(self) -> bool:
        return self.kind in DENSE_KINDS

    @property
    def is_token_level(self) -> bool:
        return self.kind in TOKEN_KINDS

    @property
    def is_regression(self) -> bool:
        return self.kind in REGRESSION_KINDS

    @property
    def metrics(self) -> tuple[Metric, ...]:
        """Every reported metric with its direction: the one list Δm, the deltas, the
        results and the report read."""
        available = {m.name: m for m in AVAILABLE_METRICS[self.kind]}
        unknown = [name for name in self.metric_names if name not in available]
        if unknown:
            raise ValueError(
                f"task {self.name!r} ({self.kind}): unknown metric {unknown[0]!r}; allowed: {', '.join(available)}"
            )
        clash = [m.name for m in self.user_metrics if m.name in available]
        if clash:
            raise ValueError(f"task {self.name!r}: metric {clash[0]!r} of its own has the name of a built-in {self.kind} metric; rename it")
        builtin = tuple(available[name] for name in self.metric_names) if self.metric_names else METRICS[self.kind]
        return builtin + tuple(Metric(m.name, m.higher_is_better) for m in self.user_metrics)

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        return task_loss(self, pred, target)

    def loss_terms(self, pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        return loss_terms(self, pred, target)

    def accumulator(self, device: torch.device) -> MetricAccumulator:
        if self.user_metrics:
            return _WithUserMetrics(self, device)
        return ACCUMULATORS[self.kind](self, device)


METRICS: dict[str, tuple[Metric, ...]] = {
    "segmentation": (Metric("miou", True), Metric("pix_acc", True)),
    "depth": (Metric("abs_err", False), Metric("rel_err", False)),
    "normals": (
        Metric("mean_angle", False),
        Metric("median_angle", False),
        Metric("within_11.25", True),
        Metric("within_22.5", True),
        Metric("within_30", True),
    ),
    "classification": (Metric("accuracy", True),),
    "tagging": (Metric("accuracy", True),),
    "spans": (Metric("f1", True), Metric("precision", True), Metric("recall", True)),
    "regression": (Metric("mse", False), Metric("mae", False)),
    "binary": (Metric("accuracy", True), Metric("auroc", True), Metric("f1", True)),
    "multilabel": (Metric("map", True), Metric("macro_f1", True)),
}

#: Every metric a kind's accumulator computes; a task may report any subset (``metric_names``).
AVAILABLE_METRICS: dict[str, tuple[Metric, ...]] = {
    **METRICS,
    "regression": (Metric("mse", False), Metric("mae", False), Metric("rmse", False), Metric("r2", True)),
}


def _valid_depth(target: Tensor) -> Tensor:
    """Depth pixels without a measurement are stored as 0 (the NYUv2/Cityscapes convention)."""
    return target > 0


def labelled_mask(task: Task, target: Tensor) -> Tensor:
    """Which targets carry a label: per entry, or per pixel for normals (shape ``(B, H, W)``)."""
    if not target.is_floating_point():
        return target != IGNORE_INDEX
    if task.kind == "depth":
        return _valid_depth(target)
    if task.kind == "normals":
        return target.abs().sum(1) > 0
    return ~target.isnan()


def entries(task: Task, pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Every entry of a batch, labelled or not, with the mask of the labelled ones; what a
    metric of one's own sees is ``scores[mask], labels[mask]``: class scores ``(n, C)`` with
    labels ``(n,)`` (classification, segmentation per pixel, token kinds per token); normals
    ``(n, 3)`` per pixel; every other kind its entries flattened to ``(n,)``. Predictions are
    the head's raw outputs (scores, logits for binary and multilabel). Batches of any size
    concatenate in this form, so the selection (whose size is read back from the device: a
    host sync) can take several at once."""
    mask = labelled_mask(task, target)
    if task.kind in ("segmentation", "normals"):  # channels first: one row per pixel
        scores, labels = pred.movedim(1, -1), target.movedim(1, -1) if task.kind == "normals" else target
    else:
        class_scores = not target.is_floating_point() and pred.dim() == target.dim() + 1
        scores, labels = pred if class_scores else pred.reshape(target.shape), target
    flat = mask.numel()
    return scores.reshape(flat, *scores.shape[mask.dim():]), labels.reshape(flat, *labels.shape[mask.dim():]), mask.reshape(flat)


def task_loss(task: Task, pred: Tensor, target: Tensor) -> Tensor:
    """The mean loss over the batch's labelled entries, 0 (with a zero gradient) when none."""
    total, count = loss_terms(task, pred, target)
    return total / count.clamp_min(1)


def loss_terms(task: Task, pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """The standard loss of each task kind (as in the MTAN/LibMTL protocols), as the sum of
    its per-entry values over the labelled entries and their count.

    Depth uses L1 over valid pixels by default (``loss_name="mse"`` for squared error);
    normals use ``1 - cos`` over valid pixels (target norm > 0); segmentation ignores
    pixels labelled :data:`IGNORE_INDEX`. A task's own ``loss_fn`` takes precedence.
    """
    if task.loss_fn is not None:
        return _custom_loss_terms(task, pred, target)
    kind = task.kind
    labelled = labelled_mask(task, target)
    if kind in ("segmentation", "classification"):
        total = F.cross_entropy(pred.float(), target, ignore_index=IGNORE_INDEX, reduction="sum")
    elif kind in TOKEN_KINDS:
        # (B, L, C) scores of (B, L) tags; padding and non-first sub-words are IGNORE_INDEX
        total = F.cross_entropy(pred.float().flatten(0, -2), target.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    elif kind == "depth":
        diff = torch.where(labelled, pred.float() - target, 0.0)
        total = (diff.pow(2) if task.loss_name == "mse" else diff.abs()).sum()
    elif kind == "normals":
        cos = (F.normalize(pred.float(), dim=1) * target).sum(1)
        total = torch.where(labelled, 1.0 - cos, 0.0).sum()
    elif kind == "regression":
        diff = torch.where(labelled, pred.float().reshape(target.shape) - target.nan_to_num(), 0.0)
        total = (diff.abs() if task.loss_name == "l1" else diff.pow(2)).sum()
    elif kind in ("binary", "multilabel"):
        logits = pred.float().reshape(target.shape)
        bce = F.binary_cross_entropy_with_logits(logits, target.nan_to_num(), reduction="none")
        total = torch.where(labelled, bce, 0.0).sum()
    else:
        raise ValueError(f"unknown task kind {kind!r}")
    return total, labelled.sum()


def _custom_loss_terms(task: Task, pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """``task.loss_fn`` on every entry, summed over the labelled ones. The callable sees
    unlabelled targets replaced by 0 and must return one loss per target entry (a
    ``torch.nn`` loss with ``reduction="none"``), so masking needs no host sync."""
    labelled = labelled_mask(task, target)
    if task.kind == "normals":
        labelled = labelled.unsqueeze(1).expand_as(target)
    class_scores = not target.is_floating_point() and pred.dim() == target.dim() + 1
    losses = task.loss_fn(pred.float() if class_scores else pred.float().reshape(target.shape), torch.where(labelled, target, 0))  # type: ignore[misc]
    if losses.shape != target.shape:
        raise ValueError(
            f"task {task.name!r}: its loss must return one value per target entry, shape {tuple(target.shape)}, "
            f"got {tuple(losses.shape)} (a torch.nn loss needs reduction: none)"
        )
    return torch.where(labelled, losses, 0.0).sum(), labelled.sum()


class _ConfusionAccumulator:
    """mIoU over the classes present in prediction or target (absent classes are skipped,
    as in the MTAN/LibMTL evaluation), and pixel accuracy over labelled pixels."""

    def __init__(self, task: Task, device: torch.device) -> None:
        self.num_classes = task.num_outputs
        self.confusion = torch.zeros(self.num_classes**2, dtype=torch.long, device=device)

    def update(self, pred: Tensor, target: Tensor) -> None:
        labels = pred.argmax(1)
        valid = target != IGNORE_INDEX
        idx = target[valid] * self.num_classes + labels[valid]
        self.confusion += torch.bincount(idx, minlength=self.num_classes**2)

    def compute(self) -> dict[str, float]:
        conf = self.confusion.view(self.num_classes, self.num_classes).double()
        true_pos = conf.diag()
        union = conf.sum(0) + conf.sum(1) - true_pos
        present = union > 0
        miou = (true_pos[present] / union[present]).mean() if present.any() else torch.tensor(0.0)
        total = conf.sum()
        pix_acc = true_pos.sum() / total if total > 0 else torch.tensor(0.0)
        return {"miou": float(miou), "pix_acc": float(pix_acc)}


class _DepthAccumulator:
    """Mean absolute and relative error over valid pixels of the whole split (pixel-weighted)."""

    def __init__(self, task: Task, device: torch.device) -> None:
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)

    def update(self, pred: Tensor, target: Tensor) -> None:
        valid = _valid_depth(target)
        p, t = pred.reshape(target.shape)[valid].double(), target[valid].double()
        err = (p - t).abs()
        self.sums += torch.stack([err.sum(), (err / t).sum(), torch.tensor(float(t.numel()), device=t.device, dtype=torch.float64)])

    def compute(self) -> dict[str, float]:
        abs_sum, rel_sum, count = self.sums.tolist()
        count = max(count, 1.0)
        return {"abs_err": abs_sum / count, "rel_err": rel_sum / count}


class _NormalsAccumulator:
    """Angle errors in degrees over valid pixels; the median comes from a 0.01-degree
    histogram kept on the device, so the whole split never has to be held in memory."""

    BINS = 18000

    def __init__(self, task: Task, device: torch.device) -> None:
        self.hist = torch.zeros(self.BINS, dtype=torch.long, device=device)
        self.sums = torch.zeros(5, dtype=torch.float64, device=device)

    def update(self, pred: Tensor, target: Tensor) -> None:
        valid = target.abs().sum(1) > 0
        cos = (F.normalize(pred.float(), dim=1) * F.normalize(target.float(), dim=1)).sum(1)[valid]
        angle = torch.rad2deg(torch.acos(cos.clamp(-1.0, 1.0))).double()
        self.hist += torch.bincount((angle / 180.0 * self.BINS).long().clamp_max(self.BINS - 1), minlength=self.BINS)
        self.sums += torch.stack(
            [angle.sum(), (angle < 11.25).sum().double(), (angle < 22.5).sum().double(),
             (angle < 30).sum().double(), torch.tensor(float(angle.numel()), device=angle.device, dtype=torch.float64)]
        )

    def compute(self) -> dict[str, float]:
        angle_sum, w11, w22, w30, count = self.sums.tolist()
        if count == 0:
            return {m.name: math.nan for m in METRICS["normals"]}
        cumulative = self.hist.cumsum(0)
        # numpy's median (MTAN/LibMTL): the middle value, or the mean of the two middle
        # values for an even count (the k-th smallest sits in the first bin reaching k)
        ranks = torch.tensor([(count + 1) // 2, count // 2 + 1], device=cumulative.device)
        median_bin = float(torch.searchsorted(cumulative, ranks).double().mean())
        return {
            "mean_angle": angle_sum / count,
            "median_angle": (median_bin + 0.5) * 180.0 / self.BINS,
            "within_11.25": w11 / count,
            "within_22.5": w22 / count,
            "within_30": w30 / count,
        }


class _AccuracyAccumulator:
    def __init__(self, task: Task, device: torch.device) -> None:
        self.counts = torch.zeros(2, dtype=torch.long, device=device)

    def update(self, pred: Tensor, target: Tensor) -> None:
        valid = target != IGNORE_INDEX
        correct = (pred.argmax(-1) == target) & valid
        self.counts += torch.stack([correct.sum(), valid.sum()])

    def compute(self) -> dict[str, float]:
        correct, total = self.counts.tolist()
        return {"accuracy": correct / max(total, 1)}


class _RegressionAccumulator:
    """Squared and absolute errors over labelled targets, and the sums R² needs (its
    denominator is the targets' variance over the whole split)."""

    def __init__(self, task: Task, device: torch.device) -> None:
        self.sums = torch.zeros(5, dtype=torch.float64, device=device)

    def update(self, pred: Tensor, target: Tensor) -> None:
        labelled = ~target.isnan()
        y = target.nan_to_num().double()
        diff = torch.where(labelled, pred.reshape(target.shape).double() - y, 0.0)
        self.sums += torch.stack([diff.pow(2).sum(), diff.abs().sum(), labelled.sum().double(), y.sum(), y.pow(2).sum()])

    def compute(self) -> dict[str, float]:
        sq, ab, count, y_sum, y_sq = self.sums.tolist()
        count = max(count, 1.0)
        total_variance = y_sq - y_sum * y_sum / count
        r2 = 1.0 - sq / total_variance if total_variance > 0 else math.nan
        return {"mse": sq / count, "mae": ab / count, "rmse": math.sqrt(sq / count), "r2": r2}


class _SpanAccumulator:
    """Chunk precision, recall and F1 as the CoNLL script counts them (:mod:`mtl_runner.spans`);
    the task's ``class_names`` are its tags."""

    def __init__(self, task: Task, device: torch.device) -> None:
        self.counter = ChunkCounter(task.class_names, device)
        self.counts = self.counter.counts  # the additive statistic summed over ranks

    def update(self, pred: Tensor, target: Tensor) -> None:
        self.counter.update(pred.argmax(-1), target, target != IGNORE_INDEX)

    def compute(self) -> dict[str, float]:
        return self.counter.compute()


#: Evaluation outputs (bytes) that a task's own metrics hold before they select the
#: labelled entries: a selection reads its size back from the device (a host sync), so
#: it happens once per this much output (for a table, once per evaluation), not per batch.
PENDING_BYTES = 64 * 2**20


class _WithUserMetrics:
    """The kind's accumulator and the task's own metrics. The additive tensors of both are
    attributes here too, because ddp sums an accumulator's tensor attributes over ranks
    (``train/distributed.py``, which :meth:`settle` s it first) and updates them in place.
    The own metrics see groups of batches, concatenated up to :data:`PENDING_BYTES`."""

    def __init__(self, task: Task, device: torch.device) -> None:
        self.task = task
        self.builtin = ACCUMULATORS[task.kind](task, device)
        self.user = {m.name: m.accumulator(device) for m in task.user_metrics}
        additive = [v for acc in (self.builtin, *self.user.values()) for v in vars(acc).values() if isinstance(v, Tensor)]
        for index, tensor in enumerate(additive):
            setattr(self, f"statistic_{index}", tensor)
        self.pending: list[tuple[Tensor, Tensor, Tensor]] = []
        self.pending_bytes = 0

    def update(self, pred: Tensor, target: Tensor) -> None:
        self.builtin.update(pred, target)
        batch = entries(self.task, pred.detach(), target)
        self.pending.append(batch)
        self.pending_bytes += sum(t.numel() * t.element_size() for t in batch)
        if self.pending_bytes >= PENDING_BYTES:
            self.settle()

    def settle(self) -> None:
        """Select the pending batches' labelled entries, in one go, for the own metrics."""
        if not self.pending:
            return
        scores, labels, mask = (torch.cat(parts) for parts in zip(*self.pending))
        self.pending, self.pending_bytes = [], 0
        count = mask.sum()
        for accumulator in self.user.values():
            accumulator.update(scores[mask], labels[mask], count)

    def compute(self) -> dict[str, float]:
        self.settle()
        return {**self.builtin.compute(), **{name: accumulator.compute() for name, accumulator in self.user.items()}}


ACCUMULATORS = {
    "segmentation": _ConfusionAccumulator,
    "depth": _DepthAccumulator,
    "normals": _NormalsAccumulator,
    "classification": _AccuracyAccumulator,
    "tagging": _AccuracyAccumulator,
    "spans": _SpanAccumulator,
    "regression": _RegressionAccumulator,
    "binary": BinaryAccumulator,
    "multilabel": MultilabelAccumulator,
}
