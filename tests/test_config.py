"""Every option composes and validates; bad input fails early with one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mtl_runner.cli import CONF_DIR
from mtl_runner.config import ConfigError, validate
from tests.conftest import compose_config, run_cli

GROUPS = ["dataset", "backbone", "sharing", "balancer", "surgery", "optimizer", "trainer", "finetune", "baseline"]


def _all_options() -> list[tuple[str, str]]:
    return [(g, p.stem) for g in GROUPS for p in sorted((CONF_DIR / g).glob("*.yaml"))]


@pytest.mark.parametrize(("group", "option"), _all_options())
def test_every_option_composes_and_validates(group: str, option: str) -> None:
    cfg = compose_config([f"{group}={option}"])
    validate(cfg)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["dataset=nope"], ["dataset=nope", "allowed:", "synthetic_scenes"]),
        (["trainer.epochs=-1"], ["trainer.epochs", ">= 1"]),
        (["trainer.epochs=abc"], ["trainer.epochs"]),
        (["optimizer.lr=abc"], ["optimizer.lr", "float"]),
        (["trainer.foo=1"], ["unknown key trainer.foo", "epochs"]),
        (["balancer.foo=1"], ["unknown key balancer.foo"]),
        (["trainer.device=tpu"], ["trainer.device", "auto, cpu, cuda"]),
        (["-m", "trainer.epochs=1,-2"], ["trainer.epochs", ">= 1"]),
        (["surgery=cagrad", "surgery.c=1.5"], ["surgery.c must be in [0, 1)"]),  # the method's own check
        (["trainer.sync_batchnorm=true"], ["trainer.sync_batchnorm=true needs trainer.strategy=ddp"]),
    ],
)
def test_bad_input_is_one_line_error(tmp_path: Path, args: list[str], expected: list[str]) -> None:
    result = run_cli(args, cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in expected:
        assert fragment in lines[0], lines[0]
    assert not (tmp_path / "outputs").exists(), "a run that cannot start must write nothing"


def test_validate_rejects_unknown_target_key() -> None:
    cfg = compose_config()
    OmegaConf.set_struct(cfg, False)
    cfg.backbone.widths = [1, 2]  # not a SmallCNN argument: e.g. a hand-edited YAML
    with pytest.raises(ConfigError, match="unknown key backbone.widths.*allowed: channels, strides"):
        validate(cfg)
