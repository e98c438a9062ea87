"""``balancer=stch``: Smooth Tchebycheff scalarisation (Lin, Zhang, Yang, Liu, Wang & Zhang,
"Smooth Tchebycheff Scalarization for Multi-Objective Optimization", ICML 2024; the
authors' multi-task code is their LibMTL fork, ``STCH_MTL``).

The paper's scalarisation of objectives ``f_t`` with preference ``lambda`` and ideal point
``z*`` is ``mu log sum_t exp(lambda_t (f_t - z*_t) / mu)``, a smooth upper bound of the
Tchebycheff ``max_t lambda_t (f_t - z*_t)`` that tends to it as ``mu -> 0``. For multi-task
learning the authors apply it to the log-losses, ``f_t = log L_t``, with ``z*_t = log n_t``
where ``n_t`` is the task's mean training loss over the last warm-up epoch, so the objective
is the scalarisation of the normalised log-losses ``x_t = log(L_t / n_t)``. We follow that:

* warm-up (the first ``warmup_epochs`` epochs): the sum of log-losses, weights ``1 / L_t``;
  :meth:`epoch_end` of the last warm-up epoch stores its mean training losses as ``n``;
* afterwards: ``F = T mu log sum_t exp(lambda_t x_t / mu)``, returned as its gradient in
  ``L`` (the engine trains on ``sum_t w_t L_t``, so the weighted gradient is ``grad F``):

      w_t = dF/dL_t = T lambda_t softmax_t(lambda x / mu) / L_t.

A run no longer than ``warmup_epochs`` epochs therefore trains on log-losses only. With
``warmup_epochs = 0`` there is no warm-up and ``n`` is the first step's losses (the
"initial losses" normalisation). As ``mu -> 0`` the weights concentrate on the worst
``lambda_t x_t``; as ``mu -> inf`` they tend to ``lambda_t / L_t`` (``F - T mu log T``
tends to ``sum_t lambda_t x_t``, the preference-weighted log-loss). :meth:`objective`
gives ``F`` itself.

Defaults are the authors' multi-task ones: ``mu = 1``, a uniform preference and five
log-loss epochs (their ``STCH_warmup_epoch = 4`` counts from 0 and also trains the
measuring epoch 4 on log-losses). ``preference`` maps task names to ``lambda_t >= 0``
(tasks not listed get 1), normalised to mean 1.

Scale: ``lambda`` has mean 1, as in the authors' code (``lambda_t = 1``), where the paper
writes it on the simplex (``lambda' = lambda / T``: since ``lambda_t x_t / mu = lambda'_t x_t /
(mu / T)``, the paper's ``mu'`` with a simplex preference is our ``mu = T mu'``); ``F``
carries the code's factor ``T``. So with the uniform preference and losses at their
normaliser the weights are ``1 / L_t``, the same as in the warm-up: the log-loss scale (as
in DB-MTL), not ``uniform``'s ``1``. This is the authors' choice, kept so that ``mu`` means
what it means in their experiments; on log-losses, ``1 / L_t`` is what ``uniform`` is.

Deviations: the paper's ``z*`` is an ideal (best attainable) point; the authors' MTL code,
which we follow, instead divides by the warm-up mean (it calls it a nadir vector), which
in log space is the ``z*_t = log n_t`` above, so the losses start near ``x = 0`` rather
than above an unknown optimum. The code measures ``n`` over every batch of the last
warm-up epoch; the trainer's epoch mean counts only applied (finite) steps. In corner
cases the paper and code leave open: losses are clamped at 1e-20 before the log (the code
adds 1e-20) and the log-weights are capped at 80, so zero losses give large but finite
weights; a non-finite loss gets weight 0 and the others the softmax without it (the
trainer skips such a step anyway); a non-finite or non-positive entry of the measured
normaliser is replaced by 1 (no normalisation for that task: dividing by ~0 would hand
that task the whole weight).

State (the normaliser, whether it is set, and the number of finished epochs) is in
buffers, so ``state_dict()`` resumes exactly; the phase switch is a ``torch.where``, so
there is no host synchronisation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from mtl_runner.errors import ConfigError
from mtl_runner.optim.balancers.base import Balancer
from mtl_runner.tasks import Task

_FLOOR = 1e-20  # the authors' log(L + 1e-20)
_MAX_EXPONENT = 80.0  # e^80 ~ 5.5e34 < float32 max


class STCH(Balancer):
    def __init__(self, mu: float = 1.0, warmup_epochs: int = 5, preference: dict[str, float] | None = None) -> None:
        super().__init__()
        if not (math.isfinite(mu) and mu > 0):
            raise ConfigError(f"balancer.mu: must be a finite float > 0, got {mu}")
        if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int) or warmup_epochs < 0:
            raise ConfigError(f"balancer.warmup_epochs: must be an integer >= 0, got {warmup_epochs!r}")
        self.mu = float(mu)
        self.warmup_epochs = int(warmup_epochs)
        # Hydra passes a DictConfig; keep a plain dict (validated in setup, with the task names).
        self.user_preference: dict[str, object] | None = (
            None if preference is None else {str(k): v for k, v in dict(preference).items()}
        )
        for name in ("preference", "log_normaliser"):
            self.register_buffer(name, torch.zeros(0))
        self.register_buffer("ready", torch.zeros((), dtype=torch.bool))
        self.register_buffer("epochs_seen", torch.zeros((), dtype=torch.long))

    def setup(self, tasks: Sequence[Task], generator: torch.Generator | None) -> None:
        super().setup(tasks, generator)
        device = self.preference.device
        values = _preference(self.user_preference, self.task_names)
        self.preference = torch.tensor(values, device=device) * (len(values) / sum(values))
        self.log_normaliser = torch.zeros(len(values), device=device)
        self.ready.fill_(False)
        self.epochs_seen.zero_()

    def objective(self, losses: Tensor) -> Tensor:
        """``F = T mu log sum_t exp(lambda_t log(L_t / n_t) / mu)`` (the sum of log-losses
        during the warm-up); differentiable in ``losses``, whose gradient is :meth:`weights`."""
        log_losses = losses.to(_work_dtype(losses)).clamp_min(_FLOOR).log()
        smooth = self.mu * torch.logsumexp(self._logits(log_losses), dim=0) * len(self.tasks)
        return torch.where(self.ready, smooth, log_losses.sum())

    def weights(self, losses: Tensor) -> Tensor:
        self._follow(losses.device)
        current = losses.detach().to(_work_dtype(losses))
        if self.warmup_epochs == 0:  # the first step's losses are the normaliser
            self._set_normaliser(current, ~self.ready)
        finite = torch.isfinite(current)
        log_losses = current.clamp_min(_FLOOR).log()
        logits = torch.where(finite, self._logits(log_losses), -torch.inf)
        log_share = torch.log_softmax(logits, dim=0)  # all tasks non-finite: NaN, masked below
        preference = self.preference.to(current.dtype)
        smooth = len(self.tasks) * preference * torch.exp((log_share - log_losses).clamp(max=_MAX_EXPONENT))
        warm = torch.exp((-log_losses).clamp(max=_MAX_EXPONENT))
        w = torch.where(self.ready, smooth, warm)
        return torch.where(finite, w, 0.0).to(losses.dtype)

    def epoch_end(self, mean_losses: Tensor) -> None:
        self._follow(mean_losses.device)
        self.epochs_seen.add_(1)
        if self.warmup_epochs > 0:
            last_warmup = (self.epochs_seen == self.warmup_epochs) & ~self.ready
            self._set_normaliser(mean_losses.detach().to(self.log_normaliser.dtype), last_warmup)

    def _logits(self, log_losses: Tensor) -> Tensor:
        dtype = log_losses.dtype
        return self.preference.to(dtype) * (log_losses - self.log_normaliser.to(dtype)) / self.mu

    def _set_normaliser(self, losses: Tensor, when: Tensor) -> None:
        usable = torch.where(torch.isfinite(losses) & (losses > 0), losses, 1.0).log()
        self.log_normaliser.copy_(torch.where(when, usable, self.log_normaliser))
        self.ready.logical_or_(when)


def _work_dtype(losses: Tensor) -> torch.dtype:
    """At least float32, so low-precision losses do not round the log-space arithmetic."""
    return torch.promote_types(losses.dtype, torch.float32)


def _preference(user: Mapping[str, object] | None, names: tuple[str, ...]) -> list[float]:
    """Per-task ``lambda_t`` from ``balancer.preference`` (tasks not listed get 1)."""
    user = user or {}
    known = ", ".join(names)
    for key in user:
        if key not in names:
            raise ConfigError(f"balancer.preference.{key}: no task named {key!r}; tasks are {known}")
    values = []
    for name in names:
        value = user.get(name, 1.0)
        try:
            number = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ConfigError(f"balancer.preference.{name}: must be a number, got {value!r}") from None
        if not (math.isfinite(number) and number >= 0):
            raise ConfigError(f"balancer.preference.{name}: must be a finite number >= 0, got {number}")
        values.append(number)
    if sum(values) <= 0:
        raise ConfigError(f"balancer.preference: at least one task needs a weight > 0, got {dict(zip(names, values))}")
    return values
