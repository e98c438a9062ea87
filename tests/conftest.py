"""Shared test helpers: tiny configurations and ways to run mtl-run."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import ModuleType
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from mtl_runner.config import CONF_DIR
from mtl_runner.optim.balancers.base import Balancer

#: Small enough that a run takes a second or two on a CPU.
TINY = [
    "dataset.num_train=64",
    "dataset.num_val=32",
    "dataset.num_test=32",
    "dataset.image_size=32",
    "backbone.channels=[8,8,16,16]",
    "trainer.epochs=1",
    "trainer.batch_size=16",
    "trainer.progress=off",
    "baseline=off",  # single-task baselines add T trainings; tests of them turn them on
]


def conf_options(group: str) -> list[str]:
    """Every option of a config group, as found in ``conf/<group>/``: tests that cover
    every option pick up a new YAML without a list to update."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=False)


def run_cli(args: Sequence[str], cwd: Path, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``mtl-run ARGS`` in a subprocess, as a user would type it."""
    full_env = {**os.environ, "HYDRA_FULL_ERROR": "0", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "mtl_runner", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env
    )


@pytest.fixture
def tiny() -> list[str]:
    return list(TINY)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models: on a shared 2-core machine extra intra-op threads only add barrier
    waits (one balancer test ran 10x slower with them). Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class FixedWeights(Balancer):
    """A balancer with given constant weights, for engine tests with non-uniform weights."""

    def __init__(self, w: list[float]) -> None:
        super().__init__()
        self.w = torch.tensor(w)

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        return self.w.to(losses)


@contextmanager
def refusing_host_reads(monkeypatch: pytest.MonkeyPatch, what: str, modules: Sequence[ModuleType]) -> Iterator[None]:
    """Inside: any read of a tensor back to the host fails, and ``modules`` see a device
    (their ``host_resident`` says no), as on a GPU where such a read would sync the step."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"{what} reads a tensor back to the host per step")

    with monkeypatch.context() as patch:
        for module in modules:
            patch.setattr(module, "host_resident", lambda tensor: False)
        for attr in ("item", "tolist", "__bool__", "__float__", "__int__", "numpy"):
            patch.setattr(torch.Tensor, attr, refuse)
        yield
