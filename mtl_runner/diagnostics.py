"""Gradient-conflict diagnostics: cosine statistics, the conflict report and its advice.

On every step of the first ``dense_steps`` and then every ``every_n_steps`` (the
diagnostics steps) the engine is asked for the per-task gradients (it reuses the step's
Jacobian when the surgery computed one anyway), and this callback logs the pairwise
cosines of the task gradients on the shared parameters, the gradient norms, the
loss-scale ratio and the fraction of negative cosines over the last
``HISTOGRAM_WINDOW`` diagnostics steps; histograms of the cosines per window of
diagnostics steps; per epoch the fraction of conflicting (negative) cosines per pair, as
scalars and as a text table with bars. At the end of the warm-up window and of the run
it writes a report (rich table, ``diagnostics.json``, TensorBoard text) with a
recommendation from the decision rule in docs/methods.md.

In the features space (``surgery.space=features``) the rows are gradients of the shared
representation rather than of the shared parameters; the report says which.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor

from mtl_runner import io
from mtl_runner.optim.jacobian import StepGradients
from mtl_runner.train.trainer import Callback, Trainer

#: Thresholds of the decision rule (docs/methods.md, "Diagnostics and the decision rule").
CONFLICT_FRACTION = 0.20
WIDE_SPREAD = 0.15
ORTHOGONAL_FRACTION = 0.05
ORTHOGONAL_MEAN = 0.1
SCALE_RATIO = 10.0
ALIGNED_MEAN = 0.8
NARROW_SPREAD = 0.1
#: Diagnostics steps per ``cos_hist`` histogram and per ``conflict_recent`` fraction. A
#: histogram per epoch held one or two samples with the sparse schedule (a spike, not a
#: distribution); a window of this many samples is a distribution, and its successive
#: windows show the drift over training.
HISTOGRAM_WINDOW = 50
#: Characters of a full bar in the per-epoch conflict table; eighth blocks below one.
BAR_WIDTH = 20
_EIGHTHS = "▏▎▍▌▋▊▉"


@dataclass
class PairStats:
    mean: float
    std: float
    frac_negative: float
    steps: int


def cosine_matrix(jacobian: Tensor) -> Tensor:
    """Pairwise cosines of the rows; a zero row has cosine 0 with everything.

    From the Gramian, whose diagonal holds the squared norms: one ``(T, P)`` float64 copy
    and one product, instead of also dividing every row by its norm (a second ``(T, P)``
    pass and temporary; a diagnostics step on a 1024 x 256 MLP spent 1.8 ms here, now
    0.2 ms). The two agree to about 1e-14, far below the float32 the cosines are logged in."""
    rows = jacobian.double()
    gram = rows @ rows.T
    norms = gram.diagonal().sqrt()
    return gram / (norms.unsqueeze(1) * norms.unsqueeze(0)).clamp_min(torch.finfo(rows.dtype).tiny)


def pair_names(task_names: tuple[str, ...]) -> list[str]:
    return [f"{a}~{b}" for a, b in itertools.combinations(task_names, 2)]


def recommend(pairs: dict[str, PairStats], loss_scale_ratio: float, num_tasks: int) -> tuple[str, str]:
    """The decision rule: (finding, recommendation) from per-pair cosine statistics."""
    if not pairs:
        return "single task", "no task pairs: conflict diagnostics do not apply"
    worst = max(pairs.values(), key=lambda s: s.frac_negative)
    conflict = worst.frac_negative > CONFLICT_FRACTION and worst.std > WIDE_SPREAD
    scale = loss_scale_ratio > SCALE_RATIO
    mean_cos = sum(s.mean for s in pairs.values()) / len(pairs)
    if conflict and scale:
        return "conflict and scale mismatch", "balancer=gradnorm surgery=pcgrad"
    if conflict:
        surgery = "surgery=cagrad (or pcgrad)" if num_tasks <= 5 else "surgery=pcgrad (or cagrad)"
        return "structural conflict", surgery
    if scale:
        return (
            f"scale problem (losses differ {loss_scale_ratio:.0f}x)",
            "balancer=uncertainty or balancer=gradnorm before any surgery",
        )
    if all(s.mean > ALIGNED_MEAN and s.std < NARROW_SPREAD for s in pairs.values()):
        return "aligned", "balancer=uniform surgery=none: uniform is optimal, surgery is wasted compute"
    if worst.frac_negative < ORTHOGONAL_FRACTION and mean_cos < ORTHOGONAL_MEAN:
        return (
            "nearly orthogonal, not adversarial",
            "balancer=uniform works; question whether sharing buys anything beyond parameters (compare sharing=none)",
        )
    return "mild conflict", "start with balancer=uniform surgery=none; compare surgery=pcgrad in a sweep"


def rule_candidates(finding: str) -> list[tuple[str, ...]]:
    """The options :func:`recommend`'s advice names for ``finding``, as override lists:
    what ``mtl-advise`` screens against measured alternatives before advising."""
    if finding.startswith("scale problem"):
        return [("balancer=uncertainty",), ("balancer=gradnorm",)]
    return {
        "conflict and scale mismatch": [("balancer=gradnorm", "surgery=pcgrad")],
        "structural conflict": [("surgery=cagrad",), ("surgery=pcgrad",)],
        "aligned": [("balancer=uniform", "surgery=none")],
        "nearly orthogonal, not adversarial": [("balancer=uniform",), ("sharing=none",)],
        "mild conflict": [("balancer=uniform", "surgery=none"), ("surgery=pcgrad",)],
    }.get(finding, [])


def fraction_bar(fraction: float) -> str:
    """A horizontal text bar ``BAR_WIDTH`` characters long at fraction 1, to the eighth of a
    character: TensorBoard draws scalars as smoothed lines only, and a per-epoch fraction
    is a value per epoch, which a bar shows as it is."""
    full, part = divmod(round(fraction * BAR_WIDTH * 8), 8)
    return "█" * full + (_EIGHTHS[part - 1] if part else "")


def pair_stats(cosines: Tensor, weights: Tensor | None = None) -> PairStats:
    """Statistics of one pair's cosines over logged steps (a 1-D tensor). ``weights``: the
    training steps each logged step stands for (a dense-phase step 1, a later one
    ``every_n_steps``), so that the report reads the run as a whole and not mostly its
    densely sampled start; equal weights give the plain mean, the unbiased standard
    deviation and the plain fraction."""
    values = cosines.double()
    w = torch.ones_like(values) if weights is None else weights.to(values)
    total = w.sum()
    mean = (w * values).sum() / total
    denominator = total - (w * w).sum() / total  # reliability weights: N - 1 for equal weights
    std = ((w * (values - mean) ** 2).sum() / denominator).sqrt() if values.numel() > 1 else values.new_zeros(())
    return PairStats(
        mean=float(mean),
        std=float(std),
        frac_negative=float((w * (values < 0)).sum() / total),
        steps=int(values.numel()),
    )


class ConflictDiagnostics(Callback):
    def __init__(
        self,
        task_names: tuple[str, ...],
        every_n_steps: int,
        warmup_steps: int,
        run_dir: Path | None,
        space: str = "params",
        histograms: bool = True,
        console: Console | None = None,
        dense_steps: int = 0,
    ) -> None:
        self.task_names = task_names
        self.pairs = pair_names(task_names)
        self.index = torch.triu_indices(len(task_names), len(task_names), offset=1)
        self.every_n_steps = every_n_steps
        self.dense_steps = dense_steps
        self.warmup_steps = warmup_steps
        self.run_dir = run_dir
        self.space = space
        self.histograms = histograms
        self.console = console or Console()
        self._epoch: list[Tensor] = []
        self._window: list[Tensor] = []
        self._all: list[Tensor] = []
        self._spans: list[int] = []  # training steps each entry of _all stands for
        self._losses: list[Tensor] = []
        self._reports: dict[str, Any] = {}
        self._not_applicable: str | None = None if len(task_names) > 1 else "a single task has no pairs"

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": list(self._epoch), "window": list(self._window), "all": list(self._all), "spans": list(self._spans),
            "losses": list(self._losses),
            "reports": dict(self._reports), "not_applicable": self._not_applicable,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._epoch, self._all, self._losses = list(state["epoch"]), list(state["all"]), list(state["losses"])
        self._window = list(state.get("window", []))  # absent from checkpoints written before windows
        # absent before the dense phase, when every entry stood for every_n_steps steps
        self._spans = list(state.get("spans", [self.every_n_steps] * len(self._all)))
        self._reports = dict(state["reports"])
        self._not_applicable = state["not_applicable"]

    def wants_jacobian(self, step: int) -> bool:
        """Whether ``step`` is a diagnostics step: every step of the dense phase, then every
        ``every_n_steps``; ``every_n_steps == 0`` turns both off."""
        if self.every_n_steps == 0 or self._not_applicable is not None:
            return False
        return step < self.dense_steps or step % self.every_n_steps == 0

    def _next_diagnostics_step(self, step: int) -> int:
        if step + 1 < self.dense_steps:
            return step + 1
        return (step // self.every_n_steps + 1) * self.every_n_steps

    def _closes_window(self, step: int) -> bool:
        """A histogram's samples are spaced alike: its window is full, or the dense phase
        ends here (the next samples are ``every_n_steps`` apart)."""
        return len(self._window) >= HISTOGRAM_WINDOW or (step == self.dense_steps - 1 and self.every_n_steps > 1)

    def on_step(self, trainer: Trainer, step: int, losses: Tensor, weights: Tensor, grads: StepGradients) -> None:
        if not self.wants_jacobian(step) or grads.jacobian is None:
            return
        if grads.jacobian.shape[1] == 0:
            self._not_applicable = "the model has no shared parameters (each task has its own encoder)"
            trainer.logger.text("diagnostics", f"Gradient-conflict diagnostics do not apply: {self._not_applicable}.")
            return
        jacobian = grads.jacobian
        cos = cosine_matrix(jacobian)[self.index[0], self.index[1]].float()
        log = trainer.logger
        log.scalars([f"cos/{p}" for p in self.pairs], cos, step)
        log.scalars([f"grad_norm/{t}" for t in self.task_names], jacobian.norm(dim=1), step)
        log.scalar("loss_scale_ratio", losses.max() / losses.min().clamp_min(1e-12), step)
        self._epoch.append(cos)
        self._window.append(cos)
        self._all.append(cos)
        self._spans.append(self._next_diagnostics_step(step) - step)
        recent = torch.stack(self._all[-HISTOGRAM_WINDOW:])  # (steps, pairs)
        log.scalars([f"conflict_recent/{p}" for p in self.pairs], (recent < 0).float().mean(0), step)
        if self._closes_window(step):
            self._log_histograms(trainer, step)
        self._losses.append(losses.float())
        if step < self.warmup_steps <= self._next_diagnostics_step(step):
            self._report("warmup", trainer, step)

    def on_epoch_end(self, trainer: Trainer, epoch: int) -> None:
        if not self._epoch:
            return
        epoch_cos = torch.stack(self._epoch)  # (steps, pairs)
        step = trainer.state.last_step
        # weighted as the report is: an epoch holding the dense phase's end is not mostly its dense part
        spans = torch.tensor(self._spans[-len(self._epoch):], dtype=torch.float32, device=epoch_cos.device).unsqueeze(1)
        fractions = (spans * (epoch_cos < 0)).sum(0) / spans.sum()
        trainer.logger.scalars([f"conflict/{p}" for p in self.pairs], fractions, step)
        if trainer.logger.enabled:
            trainer.logger.text("conflict_report/epoch", self._epoch_table(epoch, fractions.tolist(), len(self._epoch)), step)
        self._epoch.clear()

    def _epoch_table(self, epoch: int, fractions: list[float], steps: int) -> str:
        lines = [f"**epoch {epoch + 1}**: fraction of negative cosines, from {steps} diagnostics steps", "",
                 "| pair | frac < 0 | |", "|---|---|---|"]
        lines += [f"| {p} | {f:.0%} | `{fraction_bar(f)}` |" for p, f in zip(self.pairs, fractions)]
        return "\n".join(lines)

    def _log_histograms(self, trainer: Trainer, step: int) -> None:
        """``cos_hist/<pair>`` over the window of diagnostics steps since the last one."""
        if self.histograms and self._window:
            window = torch.stack(self._window)  # (steps, pairs)
            for i, p in enumerate(self.pairs):
                trainer.logger.histogram(f"cos_hist/{p}", window[:, i], step)
        self._window.clear()

    def on_fit_end(self, trainer: Trainer) -> None:
        if self._not_applicable is not None:
            self._reports["not_applicable"] = self._not_applicable
            self._write()
            return
        self._log_histograms(trainer, trainer.state.last_step)  # the last, partial window
        self._report("final", trainer, trainer.state.last_step)

    def _report(self, window: str, trainer: Trainer, step: int) -> None:
        if not self._all:
            return
        cos = torch.stack(self._all)
        spans = torch.tensor(self._spans, dtype=torch.float64, device=cos.device)
        losses = (spans.unsqueeze(1) * torch.stack(self._losses).double()).sum(0) / spans.sum()
        stats = {p: pair_stats(cos[:, i], spans) for i, p in enumerate(self.pairs)}
        ratio = float(losses.max() / losses.min().clamp_min(1e-12))
        finding, advice = recommend(stats, ratio, len(self.task_names))
        self._reports[window] = {
            "step": step,
            "space": self.space,
            "pairs": {p: asdict(s) for p, s in stats.items()},
            "loss_scale_ratio": ratio,
            "mean_losses": dict(zip(self.task_names, losses.tolist())),
            "finding": finding,
            "recommendation": advice,
        }
        self._print(window, stats, ratio, finding, advice)
        trainer.logger.text(f"conflict_report/{window}", self._markdown(window, stats, ratio, finding, advice), step)
        self._write()

    def _write(self) -> None:
        if self.run_dir is not None:
            io.write_json(self.run_dir / "diagnostics.json", self._reports)

    def _print(self, window: str, stats: dict[str, PairStats], ratio: float, finding: str, advice: str) -> None:
        table = Table(title=f"gradient conflict ({window}, {self.space} space)")
        for col in ("pair", "mean cos", "spread", "frac < 0", "steps"):
            table.add_column(col, justify="left" if col == "pair" else "right")
        for p, s in stats.items():
            table.add_row(p, f"{s.mean:+.3f}", f"{s.std:.3f}", f"{s.frac_negative:.0%}", str(s.steps))
        self.console.print(table)
        self.console.print(f"loss-scale ratio {ratio:.1f}x; finding: [bold]{finding}[/bold]; try: {advice} "
                           "(a reading of the gradients, not a measured result: mtl-advise screens it against uniform)")

    @staticmethod
    def _markdown(window: str, stats: dict[str, PairStats], ratio: float, finding: str, advice: str) -> str:
        lines = [f"**{window}**: {finding}; try `{advice}` (loss-scale ratio {ratio:.1f}x)", "",
                 "| pair | mean cos | spread | frac < 0 | steps |", "|---|---|---|---|---|"]
        lines += [f"| {p} | {s.mean:+.3f} | {s.std:.3f} | {s.frac_negative:.0%} | {s.steps} |" for p, s in stats.items()]
        return "\n".join(lines)


def custom_scalars_layout(task_names: tuple[str, ...]) -> dict[str, Any]:
    """TensorBoard CUSTOM SCALARS, one chart per quantity so that the runs of a sweep are
    the lines: a chart per task pair for the cosines (all pairs of all runs in one chart
    is a tangle) and their conflict fractions, and per-task charts for gradient norms and
    losses, whose magnitudes differ by orders between tasks (depth's 17-37 against a
    classifier's 1-2 would flatten the others on a shared linear axis). The conflict
    fractions charted are the dense ``conflict_recent`` ones: the per-epoch ``conflict``
    scalars are a few points per run, which TensorBoard's smoothing bends into values
    that never occurred."""
    def exact(tag: str) -> list[str]:
        return [f"^{re.escape(tag)}$"]

    return {
        "gradient cosines": {f"cos {p}": ["Multiline", exact(f"cos/{p}")] for p in pair_names(task_names)},
        f"conflict fraction (last {HISTOGRAM_WINDOW} diagnostics steps)": {
            f"conflict {p}": ["Multiline", exact(f"conflict_recent/{p}")] for p in pair_names(task_names)},
        "gradient norms": {f"grad_norm {t}": ["Multiline", exact(f"grad_norm/{t}")] for t in task_names},
        "train losses": {**{f"loss {t}": ["Multiline", exact(f"loss/train/{t}")] for t in task_names},
                         "loss total": ["Multiline", exact("loss/train/total")]},
        "weights": {f"weights {t}": ["Multiline", [f"^(surgery_)?weight/{re.escape(t)}$"]] for t in task_names},
    }
