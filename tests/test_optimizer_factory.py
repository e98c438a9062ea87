"""The optimizer factory's runtime choices: ``optimizer.foreach=null`` takes the
multi-tensor update wherever the kernels are not fused (torch's CPU default is a
per-tensor loop), and that update trains to the same values as the loop, bit for bit."""

from __future__ import annotations

import pytest
import torch

from mtl_runner.build import optimizer_factory
from tests.conftest import compose_config

OPTIMIZERS = ("adam", "adamw", "sgd")


def _built(overrides: list[str]) -> torch.optim.Optimizer:
    cfg = compose_config(["trainer.device=cpu", *overrides])
    return optimizer_factory(cfg)([{"params": [torch.zeros(3, requires_grad=True)]}])


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_foreach_null_is_the_multi_tensor_update_on_the_cpu(name: str) -> None:
    assert _built([f"optimizer={name}"]).param_groups[0]["foreach"] is True
    assert _built([f"optimizer={name}", "optimizer.foreach=false"]).param_groups[0]["foreach"] is False


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_fused_kernels_take_no_foreach(name: str) -> None:
    group = _built([f"optimizer={name}", "optimizer.fused=true"]).param_groups[0]
    assert group["fused"] is True and not group["foreach"]


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_the_multi_tensor_update_trains_to_the_same_values(name: str) -> None:
    generator = torch.Generator().manual_seed(0)
    shapes = [(16, 8), (8,), (3, 8), (3,)]
    start = [torch.randn(shape, generator=generator) for shape in shapes]
    trained = {}
    for foreach in (True, False):
        params = [p.clone().requires_grad_(True) for p in start]
        optimizer = optimizer_factory(compose_config([f"optimizer={name}", f"optimizer.foreach={str(foreach).lower()}"]))(
            [{"params": params}]
        )
        grads = torch.Generator().manual_seed(1)
        for _ in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=grads)
            optimizer.step()
        trained[foreach] = params
    assert all(torch.equal(a, b) for a, b in zip(trained[True], trained[False]))
