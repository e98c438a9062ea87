"""Fine-tuning controls: init_from matching and its report, frozen and gradually unfrozen
stages, layer-wise learning rates, re-initialised heads, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mtl_runner import build
from mtl_runner.assemble import build_run
from mtl_runner.build import check_compatible
from mtl_runner.config import validate
from mtl_runner.errors import ConfigError
from mtl_runner.runner import run_experiment
from mtl_runner.train import finetune
from mtl_runner.train.trainer import Callback, Trainer
from tests.conftest import TINY, compose_config, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

#: small_cnn with BatchNorm: four stages of channels 8, 8, 16, 16.
STAGES = 4


def _model(seed: int, overrides: list[str] = ()) -> torch.nn.Module:
    cfg = compose_config([*TINY, *overrides])
    taskset = build.build_taskset(cfg)
    torch.manual_seed(seed)
    return build.build_model(cfg, taskset)


def _trainer(overrides: list[str], extra_callbacks: list[Callback] = ()) -> Trainer:
    """A trainer wired as ``mtl-run`` wires it (fine-tuning included), without run files."""
    cfg = compose_config([*TINY, *overrides])
    validate(cfg)
    return build_run(cfg, None, callbacks=extra_callbacks, diagnostics=False).trainer


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_init_report_lists_matches_renames_and_reshapes(tmp_path: Path) -> None:
    source = _model(seed=0).state_dict()
    renamed_from, reshaped = "encoder.stages.1.0.weight", "encoder.stages.2.1.bias"
    source["encoder.stages.1.0.renamed"] = source.pop(renamed_from)
    source[reshaped] = torch.zeros(3)
    path = tmp_path / "edited.pt"
    torch.save({"model": source}, path)

    model = _model(seed=1)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    report = finetune.initialise_from(model, str(path))

    after = model.state_dict()
    assert set(report.loaded) == set(after) - {renamed_from, reshaped}
    for name in report.loaded:
        assert torch.equal(after[name], source[name]), name
    assert {r["name"]: r["reason"] for r in report.reinitialised} == {
        renamed_from: "absent from the checkpoint",
        reshaped: "shape mismatch: checkpoint (3), model (16)",
    }
    assert {r["name"]: r["reason"] for r in report.skipped} == {
        "encoder.stages.1.0.renamed": "absent from the model",
        reshaped: "shape mismatch: checkpoint (3), model (16)",
    }
    for name in (renamed_from, reshaped):
        assert torch.equal(after[name], fresh[name]), f"{name} must keep its fresh initialisation"


@pytest.mark.slow
def test_unreadable_checkpoint_is_a_one_line_error(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"^init_from=.*garbage.pt cannot be read \(") as info:
        finetune.initialise_from(_model(seed=0), str(garbage))
    assert "\n" not in str(info.value)

    result = run_cli([*TINY, f"init_from={tmp_path / 'missing.pt'}"], cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "init_from=" in lines[0] and "checkpoints/last.pt" in lines[0], result.stderr
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["finetune.reinit_heads=true"], "finetune.reinit_heads=true needs init_from"),
        (["finetune.lr_decay=0"], "finetune.lr_decay"),
        (["finetune.unfreeze_every=2"], "finetune.unfreeze_every=2 needs finetune.freeze_stages"),
        (["finetune.freeze_stages=-1"], "finetune.freeze_stages"),
    ],
)
def test_bad_finetune_options_are_rejected(overrides: list[str], message: str) -> None:
    cfg = compose_config([*TINY, *overrides])
    with pytest.raises(ConfigError, match=message):
        validate(cfg)
        check_compatible(cfg)


def test_too_many_frozen_stages_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=f"finetune.freeze_stages=5 but the backbone has {STAGES} stages"):
        _trainer(["finetune.freeze_stages=5"])


def test_frozen_stages_do_not_change_while_the_rest_trains(tmp_path: Path) -> None:
    run_experiment(compose_config(TINY), tmp_path / "source")
    source = _state(tmp_path / "source" / "checkpoints" / "last.pt")
    cfg = compose_config([*TINY, f"init_from={tmp_path / 'source'}", "finetune.freeze_stages=2", "trainer.epochs=2"])
    validate(cfg)
    run_experiment(cfg, tmp_path / "tuned")

    tuned = _state(tmp_path / "tuned" / "checkpoints" / "last.pt")
    report = json.loads((tmp_path / "tuned" / "init_report.json").read_text())
    assert set(report["loaded"]) == set(source) and not report["reinitialised"] and not report["skipped"]
    for name, value in tuned.items():
        frozen = name.startswith(("encoder.stages.0.", "encoder.stages.1."))
        if frozen:  # weights, BatchNorm affine and running statistics: bit-exact
            assert torch.equal(value, source[name]), name
        elif name.endswith(".weight"):
            assert not torch.equal(value, source[name]), f"{name} should have trained"


def test_reinit_heads_keeps_fresh_heads_and_loads_the_encoder(tmp_path: Path) -> None:
    path = tmp_path / "source.pt"
    torch.save({"model": _model(seed=0).state_dict()}, path)
    source = torch.load(path, weights_only=True)["model"]
    model = _model(seed=1)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    report = finetune.initialise_from(model, str(path), reinit_heads=True)
    after = model.state_dict()
    heads = [k for k in after if k.startswith("heads.")]
    assert heads and {r["name"] for r in report.reinitialised} == set(heads)
    for name in heads:
        assert torch.equal(after[name], fresh[name]) and not torch.equal(after[name], source[name]), name
    for name in report.loaded:
        assert name.startswith("encoder.") and torch.equal(after[name], source[name])


def test_layerwise_learning_rates_follow_the_decay() -> None:
    trainer = _trainer(["finetune.lr_decay=0.5", "optimizer.lr=0.01"])
    groups = {g["name"]: g for g in trainer.optimizer.param_groups if "name" in g}
    assert list(groups) == ["heads", "stage3", "stage2", "stage1", "stage0"]
    expected = {"heads": 0.01, "stage3": 0.005, "stage2": 0.0025, "stage1": 0.00125, "stage0": 0.000625}
    for name, lr in expected.items():
        assert groups[name]["lr"] == pytest.approx(lr)
    model = trainer.model
    for index in range(STAGES):
        assert {id(p) for p in groups[f"stage{index}"]["params"]} == {id(p) for p in model.encoder.stages[index].parameters()}
    assert {id(p) for p in groups["heads"]["params"]} == {id(p) for p in model.heads.parameters()}


class _RecordFrozen(Callback):
    """Which stages had no gradient, per epoch, and the engine's shared parameter count."""

    def __init__(self) -> None:
        self.frozen: dict[int, list[int]] = {}
        self.shared: dict[int, int] = {}

    def wants_jacobian(self, step: int) -> bool:
        return True  # the per-task Jacobian path, whose columns must follow the unfreezing

    def on_step(self, trainer, step, losses, weights, grads) -> None:  # type: ignore[no-untyped-def]
        epoch = trainer.state.epoch
        stages = trainer.model.encoder.stages
        self.frozen[epoch] = [i for i, s in enumerate(stages) if all(p.grad is None for p in s.parameters())]
        self.shared[epoch] = len(trainer.engine.shared)
        assert grads.jacobian is not None and grads.jacobian.shape[1] == sum(p.numel() for p in trainer.engine.shared)


def test_gradual_unfreezing_follows_the_schedule() -> None:
    recorder = _RecordFrozen()
    trainer = _trainer(
        ["finetune.freeze_stages=3", "finetune.unfreeze_every=2", "trainer.epochs=6", "dataset.num_train=16"],
        [recorder],
    )
    trainer.fit()
    assert recorder.frozen == {0: [0, 1, 2], 1: [0, 1, 2], 2: [0, 1], 3: [0, 1], 4: [0], 5: [0]}
    assert recorder.shared[0] < recorder.shared[2] < recorder.shared[4]
    assert all(p.requires_grad for p in trainer.model.parameters()), "after the schedule's last step nothing is frozen"
