"""Trivial predictors, the floor every trained model must clearly beat.

Per task kind, fitted on the training split: dense classification predicts each pixel
position's most frequent class, dense regression each position's mean (a strong floor
when, as in real scenes, depth depends on the image row), image-level classification
the majority label (token-level tasks: the most frequent tag, for every token),
image-level regression the mean, binary and multilabel tasks each
label's positive rate (as a logit). Unlabelled targets (NaN) are left out. They are evaluated with the same
metric code as the model, on the test split.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mtl_runner.data.base import Split
from mtl_runner.tasks import IGNORE_INDEX, Task


def fit_trivial(tasks: tuple[Task, ...], split: Split, device: torch.device, batch_size: int = 512) -> dict[str, Tensor]:
    """One prediction template per task, shaped like a single example's model output."""
    sums: dict[str, Tensor] = {}
    counts: dict[str, Tensor] = {}
    for _, targets in split.batches(batch_size, shuffle=False, generator=None, device=device):
        for task in tasks:
            y = targets[task.name]
            if task.kind in ("segmentation", "classification") or task.is_token_level:
                valid = y != IGNORE_INDEX
                one_hot = F.one_hot(y.clamp_min(0), task.num_outputs) * valid.unsqueeze(-1)
                stat = (one_hot.flatten(0, -2) if task.is_token_level else one_hot).sum(0).double()
                if task.kind == "segmentation":
                    stat = stat.permute(2, 0, 1)  # (C, H, W)
                n = torch.ones((), dtype=torch.float64, device=device)
            else:
                valid = (y > 0) if task.kind == "depth" else ~y.isnan()
                stat = torch.where(valid, y, 0.0).sum(0).double()
                n = valid.sum(0).double()
            sums[task.name] = sums.get(task.name, 0) + stat
            counts[task.name] = counts.get(task.name, 0) + n
    templates = {}
    for task in tasks:
        if task.kind in ("segmentation", "classification") or task.is_token_level:
            winner = sums[task.name].argmax(0)
            dim = 0 if task.kind == "segmentation" else -1
            templates[task.name] = F.one_hot(winner, task.num_outputs).movedim(-1, dim).float()
        else:
            mean = (sums[task.name] / counts[task.name].clamp_min(1)).float()
            templates[task.name] = torch.logit(mean, eps=1e-6) if task.kind in ("binary", "multilabel") else mean
    return templates


def evaluate_trivial(
    tasks: tuple[Task, ...], templates: dict[str, Tensor], split: Split, device: torch.device, batch_size: int = 512
) -> dict[str, dict[str, float]]:
    accumulators = {t.name: t.accumulator(device) for t in tasks}
    for _, targets in split.batches(batch_size, shuffle=False, generator=None, device=device):
        for task in tasks:
            y = targets[task.name]
            template = templates[task.name]
            pred = template.expand(*y.shape, *template.shape) if task.is_token_level else template.unsqueeze(0).expand(len(y), *template.shape)
            accumulators[task.name].update(pred, y)
    return {name: acc.compute() for name, acc in accumulators.items()}
