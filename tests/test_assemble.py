"""The one assembly from a config to a trainer (mtl_runner.assemble) and the one check of
choices that must fit together (mtl_runner.build.check_compatible)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mtl_runner.assemble import build_run
from mtl_runner.build import check_compatible
from mtl_runner.config import TrainerConfig
from mtl_runner.errors import ConfigError
from mtl_runner.train.callbacks import Checkpointing, TrainingLog
from tests.conftest import TINY, compose_config

LINEAR = ["dataset=linear_tasks", "backbone=linear", "trainer.device=cpu", "trainer.progress=off", "baseline=off"]


def test_features_space_with_per_task_inputs_is_refused_once_the_data_is_known() -> None:
    cfg = compose_config([*LINEAR, "surgery=pcgrad", "surgery.space=features"])
    check_compatible(cfg)  # the preflight cannot tell: which datasets give per-task inputs is the data's own
    with pytest.raises(ConfigError, match="surgery.space=features needs one representation shared by all tasks"):
        build_run(cfg, None)


@pytest.mark.parametrize(("overrides", "message"), [
    (["trainer.sync_batchnorm=true"], "trainer.sync_batchnorm=true needs trainer.strategy=ddp"),
    (["finetune.reinit_heads=true"], "finetune.reinit_heads=true needs init_from"),
    (["finetune.unfreeze_every=1"], "finetune.unfreeze_every=1 needs finetune.freeze_stages"),
])
def test_options_that_do_not_fit_together_are_one_config_error(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_compatible(compose_config([*TINY, *overrides]))


def test_the_trainer_settings_are_the_config_node() -> None:
    cfg = compose_config([*TINY, "trainer.jacobian=batched", "trainer.precision=bf16"])
    settings = build_run(cfg, None, diagnostics=False).trainer.settings
    assert isinstance(settings, TrainerConfig)
    assert (settings.jacobian, settings.precision, settings.epochs) == ("batched", "bf16", cfg.trainer.epochs)


def test_a_run_directory_adds_checkpoints_after_the_curves(tmp_path: Path) -> None:
    run = build_run(compose_config(TINY), tmp_path)
    try:
        kinds = [type(cb) for cb in run.trainer.callbacks]
        # An epoch's scalars, whoever logs them, are flushed before its checkpoint is written.
        assert kinds[-2:] == [TrainingLog, Checkpointing]
        run.trainer.fit()
    finally:
        run.logger.close()
    saved = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)
    assert saved["config"]["trainer"]["epochs"] == 1 and saved["state"]["epoch"] == 1
    assert [type(cb) for cb in build_run(compose_config(TINY), None).trainer.callbacks][-1] is TrainingLog
