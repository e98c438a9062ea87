"""Every option composes and validates; bad input fails early with one clear line.

The options come from conf/ itself: a new YAML in any group is composed, validated and
(for methods) constructed here without a list to update.
"""

from __future__ import annotations

import importlib
import inspect
import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from mtl_runner.build import build_balancer, build_surgery
from mtl_runner.config import CONF_DIR, validate
from mtl_runner.errors import ConfigError, locate
from mtl_runner.preflight import preflight
from tests.conftest import compose_config, run_cli

#: Primary configs (conf/*.yaml), one per command.
PRIMARY_CONFIGS = sorted(p.stem for p in CONF_DIR.glob("*.yaml"))


def _default_groups(primary: str) -> set[str]:
    """The groups a primary config selects in its defaults list (through the primary
    configs it extends), which an override may set without a ``+``."""
    groups: set[str] = set()
    for entry in OmegaConf.load(CONF_DIR / f"{primary}.yaml").get("defaults", []):
        if isinstance(entry, str):
            if (CONF_DIR / f"{entry}.yaml").is_file():
                groups |= _default_groups(entry)
        else:
            groups |= {str(key).split()[-1] for key in entry.keys()}
    return groups


def _all_options() -> list[tuple[str, str]]:
    """(group, option) for every YAML below conf/, nested groups (hydra/launcher) included."""
    return sorted(
        (path.parent.relative_to(CONF_DIR).as_posix(), path.stem)
        for path in CONF_DIR.rglob("*.yaml")
        if path.parent != CONF_DIR
    )


def _compose_option(group: str, option: str) -> DictConfig:
    primary = next((p for p in PRIMARY_CONFIGS if group in _default_groups(p)), "config")
    # hydra/* groups (launcher, sweeper) are in Hydra's own defaults list, so always selectable
    selected = group in _default_groups(primary) or group.split("/")[0] == "hydra"
    prefix = "" if selected else "+"
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(primary, overrides=[f"{prefix}{group}={option}"], return_hydra_config=True)


def test_every_group_is_found() -> None:
    groups = {group for group, _ in _all_options()}
    assert {"dataset", "sharing", "balancer", "surgery", "experiment", "hydra/launcher", "affinity"} <= groups


@pytest.mark.parametrize(("group", "option"), _all_options())
def test_every_option_composes_validates_and_builds_its_methods(group: str, option: str) -> None:
    cfg = _compose_option(group, option)
    validate(cfg)
    # methods check their own arguments when constructed, as the preflight does
    assert build_balancer(cfg) is not None
    assert build_surgery(cfg) is not None


@pytest.mark.parametrize(("group", "option"), [(g, o) for g, o in _all_options() if g in ("surgery", "balancer", "sharing")])
def test_every_method_class_is_exported_by_its_package(group: str, option: str) -> None:
    """``from mtl_runner.optim.surgery import PCGrad`` works for every method a YAML names."""
    target = str(OmegaConf.load(CONF_DIR / group / f"{option}.yaml")["_target_"])
    module_name, _, name = target.rpartition(".")
    package = importlib.import_module(module_name.rpartition(".")[0])
    assert inspect.isclass(getattr(importlib.import_module(module_name), name))
    assert name in package.__all__ and getattr(package, name) is getattr(importlib.import_module(module_name), name), (
        f"add {name} to {package.__name__}.__all__ (and import it there)"
    )


# ------------------------------------------------------------------ bad input: one line, exit 2, nothing written
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
        (["objective=tasks.seg"], ["objective='tasks.seg' is not allowed", "delta_m_pct"]),
        (["init_from=/no/such/file.pt"], ["init_from='/no/such/file.pt' is not allowed", "checkpoints/last.pt"]),
        (["resume=/no/such/run"], ["resume=/no/such/run: no checkpoint at /no/such/run/checkpoints/last.pt"]),
        (["-m", "resume=/no/such/run"], ["resume= applies to a single run"]),
        (["trainer.epochs=1", "trainer.epochs=[1"], ["cannot parse override"]),
        (["trainer.precision=fp8"], ["trainer.precision='fp8' is not allowed; expected 32, bf16 or fp16"]),
        (["trainer.strategy=ddp"], ["trainer.strategy=ddp runs under torchrun"]),
        (["dataset=nyuv2", "dataset.root=/no/such/dir"], ["dataset.root=/no/such/dir: NYUv2 not found", "get it from"]),
    ],
)
def test_bad_input_is_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], args: list[str], expected: list[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        preflight(args)
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("mtl-run: error: "), lines
    for fragment in expected:
        assert fragment in lines[0], lines[0]
    assert not os.listdir(tmp_path), "a run that cannot start must write nothing"


def test_good_input_passes_the_preflight(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert preflight(["surgery=pcgrad", "balancer=gradnorm"]) == []
    assert preflight(["--cfg", "job", "trainer.epochs=-1"]) == [], "an info flag only prints: nothing to check"
    assert capsys.readouterr().err == "" and not os.listdir(tmp_path)


@pytest.mark.slow
def test_bad_input_from_the_command_line(tmp_path: Path) -> None:
    """End to end, as a user types it: the process exits 2 with one line and no traceback."""
    result = run_cli(["trainer.epochs=-1"], cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == ["mtl-run: error: trainer.epochs=-1 is not allowed; expected an integer >= 1"]
    assert not (tmp_path / "outputs").exists(), "a run that cannot start must write nothing"


def test_validate_rejects_unknown_target_key() -> None:
    cfg = compose_config()
    OmegaConf.set_struct(cfg, False)
    cfg.backbone.widths = [1, 2]  # not a SmallCNN argument: e.g. a hand-edited YAML
    with pytest.raises(ConfigError, match="unknown key backbone.widths.*allowed: channels, strides"):
        validate(cfg)


def test_an_unimportable_target_logs_nothing_above_its_one_line_error(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """Hydra logs a multi-line ERROR before raising; with a handler on the root logger (as
    under Hydra's job logging) it printed above mtl-run's one-line error."""
    with pytest.raises(Exception):
        locate("no_such_pkg.thing")
    assert caplog.records == []
    with pytest.raises(SystemExit) as exit_info:
        preflight(["dataset._target_=no_such_pkg.dataset"])
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "dataset._target_: cannot import 'no_such_pkg.dataset'" in err[0], err
    assert caplog.records == []
