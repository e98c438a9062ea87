"""Sharing strategies: shapes, parameter partition, per-task forward, the identities that
tie them together (identity cross-stitch = separate networks, soft with lam=0 = separate
training), their diagnostics in TensorBoard and end-to-end runs on the built-in datasets."""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from mtl_runner import build
from mtl_runner.cli import CONF_DIR
from mtl_runner.config import ConfigError
from mtl_runner.data.base import TaskSet
from mtl_runner.models.sharing.base import SharingModel
from mtl_runner.runner import run_experiment
from tests.conftest import TINY, compose_config, conf_options

pytestmark = pytest.mark.usefixtures("one_thread")

STRATEGIES = conf_options("sharing")
BASES = {
    "small_cnn": [*TINY, "dataset.image_size=16", "dataset.num_train=32", "trainer.device=cpu"],
    "mlp": [
        "dataset=controlled", "dataset.num_train=32", "dataset.num_val=16", "dataset.num_test=16", "dataset.d=16",
        "dataset.k=4", "backbone=mlp", "backbone.hidden=[16,16]", "trainer.epochs=1", "trainer.batch_size=16",
        "trainer.progress=off", "trainer.device=cpu", "baseline=off",
    ],
    "linear": [
        "dataset=linear_tasks", "dataset.num_tasks=3", "backbone=linear", "trainer.epochs=2", "trainer.batch_size=10",
        "trainer.progress=off", "trainer.device=cpu", "baseline=off",
    ],
}
BACKBONES = ["small_cnn", "mlp"]


@functools.cache
def _base(base: str) -> DictConfig:
    return compose_config(BASES[base])


def _config(base: str, options: dict[str, str], values: dict[str, Any] | None = None) -> DictConfig:
    """Hydra composes each base once; choosing a group option loads its YAML into the
    group's node, as Hydra's composition does (composing every variant would dominate
    this file's run time)."""
    cfg = copy.deepcopy(_base(base))
    for group, option in options.items():
        cfg[group] = OmegaConf.load(CONF_DIR / group / f"{option}.yaml")
    for key, value in (values or {}).items():
        OmegaConf.update(cfg, key, value, force_add=True)
    return cfg


@functools.cache
def _taskset(base: str) -> TaskSet:
    return build.build_taskset(_base(base))


def _build(base: str, sharing: str, values: dict[str, Any] | None = None, seed: int = 0) -> tuple[SharingModel, TaskSet]:
    taskset = _taskset(base)
    torch.manual_seed(seed)
    return build.build_model(_config(base, {"sharing": sharing}, values), taskset), taskset


def _batch(taskset: TaskSet, size: int = 4) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return next(iter(taskset.train.batches(size, shuffle=False, generator=None, device=torch.device("cpu"))))


def _expected_passes(sharing: str, num_tasks: int, num_experts: int = 3) -> int:
    """Encoder passes per input at each strategy's YAML defaults (one column per task unless
    listed: a new strategy that differs adds its count here)."""
    experts = {"hard": 1, "mtan": 1, "mmoe": num_experts, "dselect_k": 4,
               "cgc": num_tasks + 1, "ple": num_tasks + 1}  # cgc, ple: one own expert per task + one shared
    return experts.get(sharing, num_tasks)


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("sharing", STRATEGIES)
def test_shapes_partition_and_per_task_forward(sharing: str, backbone: str) -> None:
    model, taskset = _build(backbone, sharing)
    reference, _ = _build(backbone, "hard")
    x, _ = _batch(taskset)
    model.eval()
    with torch.no_grad():
        out = model(x)
        expected_shapes = {name: pred.shape for name, pred in reference.eval()(x).items()}
        assert {name: pred.shape for name, pred in out.items()} == expected_shapes
        # Multi-input path: each task's forward alone gives what the joint forward gives.
        for name in model.task_names:
            torch.testing.assert_close(model.forward_task(x, name), out[name])

    shared = [id(p) for p in model.shared_parameters()]
    own = [id(p) for name in model.task_names for p in model.task_parameters(name)]
    assert len(set(shared)) == len(shared) and len(set(own)) == len(own)
    assert set(shared).isdisjoint(own)
    assert set(shared) | set(own) == {id(p) for p in model.parameters()}
    counts = model.parameter_counts()
    total = sum(p.numel() for p in model.parameters())
    assert counts["shared"] + sum(counts["task_specific"].values()) == total
    assert (counts["shared"] == 0) == (sharing in ("soft", "none"))
    last = {id(p) for p in model.last_shared_parameters()}
    assert last <= set(shared) and bool(last) == bool(shared)
    assert model.forward_passes_per_input == _expected_passes(sharing, len(model.task_names))

    # Every task's loss reaches its own parameters and, where there are any, shared ones.
    model.train()
    outputs = model(x)
    for name in model.task_names:
        grads = torch.autograd.grad(outputs[name].float().square().mean(), list(model.parameters()), retain_graph=True, allow_unused=True)
        reached = {id(p) for p, g in zip(model.parameters(), grads) if g is not None}
        assert {id(p) for p in model.task_parameters(name)} & reached
        assert not shared or set(shared) & reached
        for other in model.task_names:  # another task's own parameters stay out of reach
            if other != name:
                assert not {id(p) for p in model.task_parameters(other)} & reached


def _perturb_columns(model: nn.Module, seed: int) -> None:
    """Make the (equal at initialisation) columns differ, so mixing them shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.encoders.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("backbone", BACKBONES)
def test_identity_cross_stitch_equals_separate_networks(backbone: str) -> None:
    separate, taskset = _build(backbone, "none")
    _perturb_columns(separate, 1)
    stitched, _ = _build(backbone, "cross_stitch", {"sharing.init_self": 1.0})
    stitched.load_state_dict(separate.state_dict(), strict=False)  # same names for columns and heads
    mixed, _ = _build(backbone, "cross_stitch")
    mixed.load_state_dict(separate.state_dict(), strict=False)
    for unit in stitched.units:
        torch.testing.assert_close(unit.detach(), torch.eye(len(separate.task_names)))
    x, _ = _batch(taskset)
    with torch.no_grad():
        expected = separate.eval()(x)
        got = stitched.eval()(x)
        differs = mixed.eval()(x)
    for name in separate.task_names:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)
        assert not torch.allclose(differs[name], expected[name])  # 0.9/0.1 units do mix the columns


def test_cross_stitch_initial_units_rows_sum_to_one() -> None:
    model, _ = _build("small_cnn", "cross_stitch")
    unit = model.units[0].detach()
    assert torch.allclose(unit.diagonal(), torch.full((3,), 0.9))
    assert torch.allclose(unit.sum(1), torch.ones(3))


def test_soft_penalty_is_the_pairwise_distance() -> None:
    model, _ = _build("mlp", "soft", {"sharing.lam": 0.5})
    _perturb_columns(model, 2)
    encoders = list(model.encoders.values())
    pairwise = sum(
        (a - b).square().sum()
        for i in range(len(encoders))
        for j in range(i + 1, len(encoders))
        for a, b in zip(encoders[i].parameters(), encoders[j].parameters())
    )
    penalty = model.penalty()
    assert penalty is not None
    torch.testing.assert_close(penalty, 0.5 * pairwise)
    assert _build("mlp", "soft", {"sharing.lam": 0.0})[0].penalty() is None


def _model_state(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["model"]


def test_soft_with_zero_lambda_trains_exactly_as_separate(tmp_path: Path) -> None:
    states = {}
    for name, sharing, values in [("none", "none", {}), ("soft0", "soft", {"sharing.lam": 0.0}), ("soft", "soft", {"sharing.lam": 1.0})]:
        run_experiment(_config("small_cnn", {"sharing": sharing}, {**values, "diagnostics.every_n_steps": 0}), tmp_path / name)
        states[name] = _model_state(tmp_path / name)
    assert states["none"].keys() == states["soft0"].keys()
    for key, value in states["none"].items():
        assert torch.equal(value, states["soft0"][key]), key
    assert any(not torch.equal(v, states["soft"][k]) for k, v in states["none"].items())


def test_mmoe_expert_dropout_and_gate_usage() -> None:
    model, taskset = _build("mlp", "mmoe", {"sharing.num_experts": 4, "sharing.expert_dropout": 0.5})
    x, _ = _batch(taskset, 8)
    torch.manual_seed(0)
    model.train()
    dropped = model(x)
    model.expert_dropout = 0.0
    kept = model(x)
    assert any(not torch.allclose(dropped[n], kept[n]) for n in model.task_names)
    usage = model.diagnostics()
    assert set(usage) == {f"mmoe/{t}/expert{e}" for t in model.task_names for e in range(4)}
    for t in model.task_names:
        total = sum(usage[f"mmoe/{t}/expert{e}"] for e in range(4))
        torch.testing.assert_close(total, torch.tensor(1.0))
    # One expert: dropout never drops every expert, so the output is unchanged.
    single, _ = _build("mlp", "mmoe", {"sharing.num_experts": 1, "sharing.expert_dropout": 0.9})
    single.train()
    first = single(x)
    single.expert_dropout = 0.0
    for name, pred in single(x).items():
        torch.testing.assert_close(pred, first[name])


def test_mmoe_smaller_experts() -> None:
    model, taskset = _build("small_cnn", "mmoe", {"sharing.expert": {"channels": [4, 4, 8, 8]}})
    assert model.experts[0].stage_channels == (4, 4, 8, 8)
    x, _ = _batch(taskset)
    assert model(x)["count"].shape == (4, 4)


@pytest.mark.parametrize(
    ("options", "values", "fragment"),
    [
        ({"sharing": "soft"}, {"sharing.lam": -1.0}, "sharing.lam must be >= 0"),
        ({"sharing": "mmoe"}, {"sharing.num_experts": 0}, "sharing.num_experts must be >= 1"),
        ({"sharing": "mmoe"}, {"sharing.expert_dropout": 1.0}, "sharing.expert_dropout must be in [0, 1)"),
        ({"sharing": "mmoe"}, {"sharing.expert": {"widths": [4]}}, "sharing.expert={'widths': [4]}: not arguments of the backbone"),
        ({"sharing": "cross_stitch"}, {"sharing.init_self": 2.0}, "sharing.init_self must be in [0, 1]"),
        ({"sharing": "film"}, {"sharing.embedding_dim": 0}, "sharing.embedding_dim must be >= 1"),
        ({"sharing": "none", "surgery": "pcgrad"}, {}, "surgery=pcgrad acts on shared parameters, but sharing=none has none"),
        ({"sharing": "soft", "balancer": "gradnorm"}, {}, "balancer=gradnorm needs task gradients of shared parameters, but sharing=soft"),
    ],
)
def test_bad_choices_are_one_line_config_errors(
    tmp_path: Path, options: dict[str, str], values: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(ConfigError) as info:
        run_experiment(_config("small_cnn", options, values), tmp_path / "run")
    assert fragment in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "run" / "results.json").exists()


def _scalar_tags(tb_dir: Path) -> set[str]:
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return set(acc.Tags()["scalars"])


DIAGNOSTIC_TAGS = {
    "cross_stitch": ["cross_stitch/stage0/seg~depth", "cross_stitch/stage3/count~count"],
    "mmoe": ["mmoe/seg/expert0", "mmoe/count/expert2"],
    "soft": ["loss/train/soft_penalty", "soft/distance"],
}


@pytest.mark.parametrize("sharing", STRATEGIES)
def test_every_strategy_trains_the_built_in_dataset(tmp_path: Path, sharing: str) -> None:
    cfg = _config("small_cnn", {"sharing": sharing}, {"diagnostics.every_n_steps": 1, "trainer.log_every_n_steps": 1})
    results = run_experiment(cfg, tmp_path)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["status"] == "completed"
    assert on_disk["forward_passes_per_input"] == _expected_passes(sharing, 3)
    assert on_disk["parameters"]["mtl"] > 0 and "task_specific" in on_disk["parameters"]
    assert results["tasks"].keys() == {"seg", "depth", "count"}
    tags = _scalar_tags(tmp_path)
    for tag in DIAGNOSTIC_TAGS.get(sharing, []):
        assert tag in tags, tag
    diagnostics = json.loads((tmp_path / "diagnostics.json").read_text())
    if sharing in ("soft", "none"):
        assert "no shared parameters" in diagnostics["not_applicable"]
    else:
        assert "cos/seg~depth" in tags and "not_applicable" not in diagnostics


@pytest.mark.parametrize("sharing", STRATEGIES)
def test_every_strategy_trains_the_multi_input_dataset(tmp_path: Path, sharing: str) -> None:
    values = {"sharing.num_levels": 1} if sharing == "ple" else None  # the linear backbone has one stage
    results = run_experiment(_config("linear", {"sharing": sharing}, values), tmp_path)
    assert results["status"] == "completed" and results["steps"] == 6
    assert all(torch.isfinite(torch.tensor(v)) for v in results["test_losses"].values())
