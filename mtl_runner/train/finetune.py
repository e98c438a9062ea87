"""Fine-tuning controls: initialise from a checkpoint, freeze and gradually unfreeze
backbone stages, layer-wise learning-rate decay, re-initialised heads.

Everything works on the two things every sharing strategy has: backbones that expose
ordered ``stages`` (:class:`~mtl_runner.models.backbones.Backbone`) and a ``heads``
``ModuleDict``. Strategies with one encoder per task (``none``, ``soft``,
``cross_stitch``) have several backbones; stage ``i`` then means stage ``i`` of every
column, so the controls mean the same thing for every strategy.

- ``init_from``: parameters and buffers are matched by name and shape; a model tensor
  without a match keeps the fresh (seeded) initialisation it was built with. That is
  also how ``finetune.reinit_heads`` works: head tensors are never copied, so they are
  exactly what a fresh model of this seed would start with.
- A frozen stage has ``requires_grad`` off (its parameters get no gradient, and
  optimizers skip parameters without one, weight decay included) and runs in eval
  mode even while the model trains, so BatchNorm's running statistics stay as loaded.
- Gradual unfreezing (ULMFiT-style, top down): the number of frozen stages in epoch
  ``e`` is ``max(0, k - e // n)``, a pure function of the epoch, so a resumed run
  freezes exactly what the interrupted run froze.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.utils.hooks import RemovableHandle

from mtl_runner import io
from mtl_runner.checkpoints import read_model_state
from mtl_runner.errors import ConfigError
from mtl_runner.models.backbones import Backbone
from mtl_runner.train.trainer import Callback, Trainer

HEADS_PREFIX = "heads."


# ------------------------------------------------------------------ init_from
@dataclass
class InitReport:
    """What ``init_from`` did to each tensor: ``loaded`` names the copied model tensors;
    ``reinitialised`` the model tensors that kept their fresh initialisation and
    ``skipped`` the checkpoint tensors that were not used, each ``{"name", "reason"}``."""

    source: str
    loaded: list[str] = field(default_factory=list)
    reinitialised: list[dict[str, str]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> Table:
        table = Table(title=f"init_from {self.source}", title_justify="left")
        table.add_column("tensor")
        table.add_column("status")
        table.add_column("reason")
        table.add_row(f"{len(self.loaded)} tensors", "[green]loaded[/]", "name and shape match")
        for row in self.reinitialised:
            table.add_row(row["name"], "[yellow]re-initialised[/]", row["reason"])
        for row in self.skipped:
            table.add_row(row["name"], "[red]skipped[/]", row["reason"])
        return table


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(map(str, t.shape)) + ")"


def initialise_from(model: nn.Module, init_from: str, reinit_heads: bool = False) -> InitReport:
    """Copy every tensor of the checkpoint whose name and shape match one of ``model``'s
    (parameters and buffers); with ``reinit_heads`` the heads are left as built."""
    source = read_model_state(init_from)
    report = InitReport(source=init_from)
    target = model.state_dict()
    with torch.no_grad():
        for name, tensor in target.items():
            theirs = source.get(name)
            if reinit_heads and name.startswith(HEADS_PREFIX):
                report.reinitialised.append({"name": name, "reason": "finetune.reinit_heads"})
                if theirs is not None:
                    report.skipped.append({"name": name, "reason": "finetune.reinit_heads"})
            elif theirs is None:
                report.reinitialised.append({"name": name, "reason": "absent from the checkpoint"})
            elif theirs.shape != tensor.shape:
                reason = f"shape mismatch: checkpoint {_shape(theirs)}, model {_shape(tensor)}"
                report.reinitialised.append({"name": name, "reason": reason})
                report.skipped.append({"name": name, "reason": reason})
            else:
                tensor.copy_(theirs)
                report.loaded.append(name)
    report.skipped += [{"name": name, "reason": "absent from the model"} for name in source if name not in target]
    return report


# ------------------------------------------------------------------- stages
def backbones(model: nn.Module) -> list[Backbone]:
    """The model's backbones (one for hard sharing, one per column for ``none``/``soft``/...)."""
    return [m for m in model.modules() if isinstance(m, Backbone)]


def stage_count(model: nn.Module) -> int:
    found = backbones(model)
    return min(len(b.stages) for b in found) if found else 0


def stages_at(model: nn.Module, index: int) -> list[nn.Module]:
    """Stage ``index`` of every backbone."""
    return [b.stages[index] for b in backbones(model)]


def _keep_eval(module: nn.Module, args: Any) -> None:
    """Forward pre-hook of a frozen stage: ``model.train()`` runs every step, so the
    stage returns to eval mode (BatchNorm uses and keeps its running statistics)."""
    del args
    module.train(False)


class StageFreezing(Callback):
    """Freezes the first ``freeze_stages`` stages of every backbone; with
    ``unfreeze_every = n > 0`` one more stage, from the top down, is unfrozen every
    ``n`` epochs. Freezing is applied on construction (so the optimizer and the
    gradient engine are built around it), at the start of ``fit`` (a resumed run) and
    after each epoch; the engine re-reads its trainable parameters whenever it changes."""

    def __init__(self, model: nn.Module, freeze_stages: int, unfreeze_every: int = 0) -> None:
        available = stage_count(model)
        if freeze_stages > available:
            raise ConfigError(f"finetune.freeze_stages={freeze_stages} but the backbone has {available} stages; allowed: 0..{available}")
        self.model = model
        self.freeze_stages = freeze_stages
        self.unfreeze_every = unfreeze_every
        self.frozen = 0
        self._hooks: list[RemovableHandle] = []
        self.apply(self.frozen_at(0))

    def frozen_at(self, epoch: int) -> int:
        """How many stages are frozen while training epoch ``epoch`` (0-based)."""
        if self.unfreeze_every <= 0:
            return self.freeze_stages
        return max(0, self.freeze_stages - epoch // self.unfreeze_every)

    def apply(self, frozen: int) -> bool:
        """Freeze stages ``[0, frozen)``, unfreeze the rest; True when anything changed."""
        if frozen == self.frozen:
            return False
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        for index in range(stage_count(self.model)):
            for stage in stages_at(self.model, index):
                stage.requires_grad_(index >= frozen)
                if index < frozen:
                    self._hooks.append(stage.register_forward_pre_hook(_keep_eval))
        self.frozen = frozen
        return True

    def _update(self, trainer: Trainer, epoch: int) -> None:
        if self.apply(self.frozen_at(epoch)):
            trainer.engine.refresh_parameters()

    def on_fit_start(self, trainer: Trainer) -> None:
        self._update(trainer, trainer.state.epoch)

    def on_epoch_end(self, trainer: Trainer, epoch: int) -> None:
        before = self.frozen
        self._update(trainer, epoch + 1)
        if self.frozen != before:
            trainer.logger.scalar("finetune/frozen_stages", float(self.frozen), trainer.state.last_step)


# ---------------------------------------------------------- learning rates
def layerwise_param_groups(model: nn.Module, lr: float, decay: float) -> list[dict[str, Any]]:
    """Optimizer parameter groups with layer-wise learning-rate decay: everything outside
    the backbones' stages (heads, attention modules, cross-stitch units, ...) gets
    ``lr``, the last stage ``lr * decay``, the one before ``lr * decay**2``, and so on.
    Backbone parameters outside every stage (a stem) join the first stage's group.
    Frozen parameters are included, so unfreezing needs no new groups; until then
    they have no gradient and the optimizer leaves them alone."""
    count = stage_count(model)
    stage_ids: list[set[int]] = [{id(p) for stage in stages_at(model, i) for p in stage.parameters()} for i in range(count)]
    backbone_ids = {id(p) for b in backbones(model) for p in b.parameters()}
    if count:
        stem = backbone_ids - set().union(*stage_ids)
        stage_ids[0] |= stem
    groups: list[dict[str, Any]] = [
        {"name": "heads", "params": [p for p in model.parameters() if id(p) not in backbone_ids], "lr": lr}
    ]
    for index in reversed(range(count)):
        params = [p for p in model.parameters() if id(p) in stage_ids[index]]
        groups.append({"name": f"stage{index}", "params": params, "lr": lr * decay ** (count - index)})
    return [g for g in groups if g["params"]]


def setup(model: nn.Module, cfg: Any, console: Console | None, run_dir: Path | None, resuming: bool) -> tuple[list[dict[str, Any]] | None, list[Callback]]:
    """Apply the run's ``init_from`` and ``finetune`` settings to a freshly built model.

    Returns the optimizer's parameter groups (``None``: the trainer's default, one group
    of all trainable parameters) and the callbacks to add. A resumed run loads its own
    checkpoint afterwards, so ``init_from`` is not read again."""
    ft = cfg.finetune
    if cfg.init_from and not resuming:
        report = initialise_from(model, str(cfg.init_from), reinit_heads=bool(ft.reinit_heads))
        if console is not None:
            console.print(report.table())
        if run_dir is not None:
            io.write_json(Path(run_dir) / "init_report.json", report.to_dict())
    callbacks: list[Callback] = []
    if ft.freeze_stages > 0:
        callbacks.append(StageFreezing(model, ft.freeze_stages, ft.unfreeze_every))
    if ft.freeze_stages == 0 and ft.lr_decay == 1.0:
        return None, callbacks
    return layerwise_param_groups(model, float(cfg.optimizer.lr), float(ft.lr_decay)), callbacks
