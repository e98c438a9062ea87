"""Expert-routing sharing strategies (cgc, ple, dselect_k, learning_to_branch): shapes and
the parameter partition, gates that are distributions, the routing each paper defines
(CGC's gates stay within their task's experts, PLE with one level is CGC, DSelect-k's
saturated gates pick at most k experts, Learning to Branch's fixed tree is the argmax of
its parent choices), their statistics in TensorBoard, end-to-end runs and exact resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mtl_runner import build
from mtl_runner.cli import CONF_DIR
from mtl_runner.config import ConfigError
from mtl_runner.models.sharing.base import SharingModel
from mtl_runner.models.sharing.dselect_k import DSelectK, smooth_step
from mtl_runner.models.sharing.learning_to_branch import LearningToBranch
from mtl_runner.runner import run_experiment
from tests.conftest import compose_config
from tests.test_sharing import _taskset
from tests.test_sharing import _config as sharing_config

pytestmark = pytest.mark.usefixtures("one_thread")

EXPERTS = ["cgc", "ple", "dselect_k", "learning_to_branch"]


def _config(base: str, sharing: str, values: dict[str, Any] | None = None) -> DictConfig:
    return sharing_config(base, {"sharing": sharing}, values)


def _build(base: str, sharing: str, values: dict[str, Any] | None = None, seed: int = 0) -> SharingModel:
    torch.manual_seed(seed)
    return build.build_model(_config(base, sharing, values), _taskset(base))


def _inputs(base: str, size: int = 4) -> torch.Tensor:
    return next(iter(_taskset(base).train.batches(size, shuffle=False, generator=None, device=torch.device("cpu"))))[0]


VARIANTS = [
    ("cgc", {}),
    ("ple", {}),
    ("ple", {"sharing.num_levels": 2, "sharing.num_task_experts": 2, "sharing.num_shared_experts": 2}),
    ("dselect_k", {}),
    ("dselect_k", {"sharing.per_example": False, "sharing.num_experts": 3}),
    ("learning_to_branch", {}),
    ("learning_to_branch", {"sharing.tree": [[0, 0, 0], [0, 0, 1], [0, 1, 1]]}),
]


@pytest.mark.parametrize("backbone", ["small_cnn", "mlp"])
@pytest.mark.parametrize(("sharing", "values"), VARIANTS)
def test_shapes_partition_and_reach(backbone: str, sharing: str, values: dict[str, Any]) -> None:
    if backbone == "mlp" and "sharing.tree" in values:
        values = {"sharing.tree": [[0, 0]]}  # two stages (the root, the task layer), two tasks
    model = _build(backbone, sharing, values)
    reference = _build(backbone, "hard")
    x = _inputs(backbone)
    model.eval()
    with torch.no_grad():
        out = model(x)
        assert {n: p.shape for n, p in out.items()} == {n: p.shape for n, p in reference.eval()(x).items()}
        for name in model.task_names:
            torch.testing.assert_close(model.forward_task(x, name), out[name])

    shared = [id(p) for p in model.shared_parameters()]
    own = {name: [id(p) for p in model.task_parameters(name)] for name in model.task_names}
    every_own = [i for ids in own.values() for i in ids]
    assert shared and len(set(shared)) == len(shared) and len(set(every_own)) == len(every_own)
    assert set(shared).isdisjoint(every_own) and set(shared) | set(every_own) == {id(p) for p in model.parameters()}
    assert {id(p) for p in model.last_shared_parameters()} <= set(shared) and model.last_shared_parameters()
    counts = model.parameter_counts()
    assert counts["shared"] + sum(counts["task_specific"].values()) == sum(p.numel() for p in model.parameters())

    model.train()
    torch.manual_seed(1)
    outputs = model(x)
    params = list(model.parameters())
    for name in model.task_names:
        grads = torch.autograd.grad(outputs[name].float().square().mean(), params, retain_graph=True, allow_unused=True)
        reached = {id(p) for p, g in zip(params, grads) if g is not None and bool(g.abs().sum() > 0)}
        assert set(own[name]) <= {id(p) for p, g in zip(params, grads) if g is not None}
        assert set(shared) & reached
        for other in model.task_names:
            if other != name:
                assert not set(own[other]) & {id(p) for p, g in zip(params, grads) if g is not None}


@pytest.mark.parametrize(("sharing", "values"), VARIANTS[:5])
def test_gates_are_distributions(sharing: str, values: dict[str, Any]) -> None:
    model = _build("mlp", sharing, values)
    x = _inputs("mlp", 8)
    model.train()
    model(x)
    usage = model.diagnostics()
    gates: dict[str, list[torch.Tensor]] = {}
    for tag, value in usage.items():
        gates.setdefault(tag.rsplit("/", 1)[0], []).append(value)
    assert gates
    for gate, values_ in gates.items():
        weights = torch.stack(values_)
        assert bool((weights >= 0).all()), gate
        torch.testing.assert_close(weights.sum(), torch.tensor(1.0), msg=gate)
    if isinstance(model, DSelectK):  # every example's gate, not only the batch mean
        for name in model.task_names:
            q, _ = model.gate_weights(name, x)
            assert bool((q >= 0).all())
            torch.testing.assert_close(q.sum(-1), torch.ones(len(x)))


def test_smooth_step_is_the_papers_cubic() -> None:
    gamma = 2.0
    t = torch.tensor([-5.0, -1.0, -0.5, 0.0, 0.5, 1.0, 5.0], requires_grad=True)
    s = smooth_step(t, gamma)
    torch.testing.assert_close(s.detach(), torch.tensor([0.0, 0.0, 0.5 - 0.375 + 0.03125, 0.5, 0.5 + 0.375 - 0.03125, 1.0, 1.0]))
    (grad,) = torch.autograd.grad(s.sum(), t)
    assert grad[0] == 0 and grad[-1] == 0 and grad[3] == pytest.approx(3 / (2 * gamma))


@pytest.mark.parametrize(("num_experts", "k", "per_example"), [(8, 2, True), (5, 3, True), (4, 1, False)])
def test_dselect_k_selects_at_most_k_experts_once_saturated(num_experts: int, k: int, per_example: bool) -> None:
    model = _build("mlp", "dselect_k", {"sharing.num_experts": num_experts, "sharing.k": k,
                                        "sharing.per_example": per_example, "sharing.entropy_reg": 0.1})
    assert isinstance(model, DSelectK)
    x = _inputs("mlp", 8)
    model.train()
    for name in model.task_names:  # before saturation the gates spread over more than k experts
        assert bool(((model.gate_weights(name, x)[0] > 1e-6).sum(-1) > k).all())
    gen = torch.Generator().manual_seed(0)
    selectors = k * model.num_bits
    with torch.no_grad():  # drive every selector logit beyond +-gamma/2, whatever the input
        for gate in model.gates.values():
            signs = torch.randint(0, 2, (selectors,), generator=gen).float() * 2 - 1
            if per_example:
                linear = gate[1]
                linear.weight[:selectors] = 0.0
                linear.bias[:selectors] = signs * model.gamma
                linear.weight[selectors:] = 0.1 * torch.randn(linear.weight[selectors:].shape, generator=gen)
            else:
                gate.logits[:selectors] = signs * model.gamma
                gate.logits[selectors:] = torch.randn(k, generator=gen)
    model(x)
    penalty = model.penalty()
    assert penalty is not None and float(penalty.detach()) == pytest.approx(0.0, abs=1e-6)  # saturated selectors: no entropy
    for name in model.task_names:
        q, codes = model.gate_weights(name, x)
        assert bool(((codes == 0) | (codes == 1)).all())
        assert bool(((q > 0).sum(-1) <= k).all())
        torch.testing.assert_close(q.sum(-1), torch.ones(len(x)))


def test_cgc_task_gates_never_route_to_another_tasks_experts() -> None:
    model = _build("small_cnn", "cgc", {"sharing.num_task_experts": 2, "sharing.num_shared_experts": 2})
    level = model.levels[0]
    assert all(gate[-1].out_features == 2 + 2 for gate in level.task_gates.values()) and level.shared_gate is None
    x = _inputs("small_cnn")
    model.eval()
    with torch.no_grad():
        before = model(x)
        for p in level.task_experts["seg"].parameters():
            p.add_(torch.randn_like(p))
        after = model(x)
    assert not torch.allclose(before["seg"], after["seg"])
    for name in ("depth", "count"):
        torch.testing.assert_close(before[name], after[name])


def test_ple_with_one_level_is_cgc() -> None:
    values = {"sharing.num_task_experts": 2, "sharing.num_shared_experts": 1}
    cgc = _build("small_cnn", "cgc", values)
    ple = _build("small_cnn", "ple", {**values, "sharing.num_levels": 1})
    cgc_state, ple_state = cgc.state_dict(), ple.state_dict()
    assert list(cgc_state) == list(ple_state)
    for key, value in cgc_state.items():
        torch.testing.assert_close(ple_state[key], value)
    x = _inputs("small_cnn")
    for name, pred in cgc.eval()(x).items():
        torch.testing.assert_close(ple.eval()(x)[name], pred)
    assert {tag.split("/", 1)[1] for tag in cgc.diagnostics()} == {tag.split("/", 1)[1] for tag in ple.diagnostics()}
    # Two levels: a shared gate over every expert of the first level, none on the last.
    two = _build("small_cnn", "ple", values)
    assert two.levels[0].shared_gate[-1].out_features == 3 * 2 + 1 and two.levels[1].shared_gate is None


def _random_parent_logits(model: LearningToBranch, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    assert model.parents is not None
    with torch.no_grad():
        for layer in model.parents:
            for logits in layer:
                logits.copy_(torch.randn(logits.shape, generator=gen))
    return [[int(torch.argmax(logits)) for logits in layer] for layer in model.parents]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_learning_to_branch_fixed_tree_is_the_argmax_and_holds_only_its_nodes(seed: int) -> None:
    search = _build("small_cnn", "learning_to_branch")
    assert isinstance(search, LearningToBranch)
    expected = _random_parent_logits(search, seed)
    x = _inputs("small_cnn")
    search.eval()
    with torch.no_grad():
        evaluated = search(x)
    reported = search.parameter_counts()
    tree = search.fix_tree()
    assert tree == expected == reported["tree"]
    total = sum(p.numel() for p in search.parameters())
    assert total == reported["tree_parameters"]
    # Independently: each layer's stage size times the nodes some head is reached through.
    template = _build("small_cnn", "hard")
    stage_sizes = [sum(p.numel() for p in stage.parameters()) for stage in template.encoder.stages]
    used = [{0, 1, 2}]
    for parents in reversed(tree):
        used.insert(0, {parents[c] for c in used[0]})
    heads = sum(p.numel() for p in search.heads.parameters())
    assert total == sum(size * len(nodes) for size, nodes in zip(stage_sizes, used)) + heads
    with torch.no_grad():  # the evaluated search model is the fixed tree
        for name, pred in search.eval()(x).items():
            torch.testing.assert_close(pred, evaluated[name])
    # The same tree from the config: the same modules, names and (same seed) weights.
    fixed = _build("small_cnn", "learning_to_branch", {"sharing.tree": tree})
    fixed_state = fixed.state_dict()
    assert list(fixed_state) == list(search.state_dict())
    assert fixed.parameter_counts()["tree"] == tree and not fixed.diagnostics()


def test_learning_to_branch_samples_in_training_and_is_deterministic_in_evaluation() -> None:
    model = _build("small_cnn", "learning_to_branch", {"sharing.hard": True})
    _random_parent_logits(model, 3)
    x = _inputs("small_cnn")
    model.train()
    first, second = model(x), model(x)
    assert any(not torch.equal(first[n], second[n]) for n in model.task_names)
    torch.manual_seed(5)
    again = model(x)
    torch.manual_seed(5)
    for name, pred in model(x).items():  # the noise comes from torch's seeded global generator
        torch.testing.assert_close(pred, again[name])
    model.eval()
    for name, pred in model(x).items():
        torch.testing.assert_close(pred, model(x)[name])


@pytest.mark.parametrize(
    ("sharing", "values", "fragment"),
    [
        ("cgc", {"sharing.num_shared_experts": 0}, "sharing.num_shared_experts must be >= 1"),
        ("ple", {"sharing.num_levels": 5}, "sharing.num_levels must be in 1..4"),
        ("dselect_k", {"sharing.k": 0}, "sharing.k must be >= 1"),
        ("dselect_k", {"sharing.gamma": 0.0}, "sharing.gamma must be > 0"),
        ("learning_to_branch", {"sharing.tree": [[0, 0]]}, "sharing.tree=[[0, 0]]: needs one list per layer"),
        ("learning_to_branch", {"sharing.temperature": 0.0}, "sharing.temperature must be > 0"),
        ("cgc", {"surgery": OmegaConf.load(CONF_DIR / "surgery" / "mgda.yaml"), "surgery.space": "features"},
         "surgery.space=features"),
    ],
)
def test_bad_choices_are_one_line_config_errors(tmp_path: Path, sharing: str, values: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        run_experiment(_config("small_cnn", sharing, values), tmp_path / "run")
    assert fragment in str(info.value) and "\n" not in str(info.value)


def _scalars(tb_dir: Path) -> dict[str, list[float]]:
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


STATISTICS = {
    "cgc": ["cgc/seg/seg0", "cgc/seg/shared0", "cgc/count/count0"],
    "ple": ["ple/level0/seg/seg0", "ple/level0/shared/depth0", "ple/level0/shared/shared0", "ple/level1/count/shared0"],
    "dselect_k": ["dselect_k/seg/expert0", "dselect_k/count/expert3", "loss/train/dselect_k_entropy"],
    "learning_to_branch": ["learning_to_branch/layer1/node0/parent0", "learning_to_branch/layer3/node2/parent1"],
}


@pytest.mark.parametrize("sharing", EXPERTS)
def test_trains_the_built_in_dataset_and_logs_its_routing(tmp_path: Path, sharing: str) -> None:
    values = {"diagnostics.every_n_steps": 1, "trainer.log_every_n_steps": 1, "sharing.entropy_reg": 0.01}
    if sharing != "dselect_k":
        values.pop("sharing.entropy_reg")
    results = run_experiment(_config("small_cnn", sharing, values), tmp_path)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["status"] == "completed" and results["tasks"].keys() == {"seg", "depth", "count"}
    assert on_disk["forward_passes_per_input"] == {"cgc": 4, "ple": 4, "dselect_k": 4, "learning_to_branch": 3}[sharing]
    scalars = _scalars(tmp_path)
    for tag in STATISTICS[sharing]:
        assert tag in scalars and all(0.0 <= v <= 1.0 or tag.startswith("loss/") for v in scalars[tag]), tag
    assert "cos/seg~depth" in scalars
    if sharing == "learning_to_branch":
        assert len(on_disk["parameters"]["tree"]) == 3 and on_disk["parameters"]["tree_parameters"] > 0


@pytest.mark.parametrize("sharing", EXPERTS)
def test_trains_with_surgery_in_the_params_space(tmp_path: Path, sharing: str) -> None:
    cfg = _config("mlp", sharing, {"surgery": OmegaConf.load(CONF_DIR / "surgery" / "pcgrad.yaml")})
    results = run_experiment(cfg, tmp_path)
    assert results["status"] == "completed"
    assert all(torch.isfinite(torch.tensor(v)) for v in results["test_losses"].values())


def _final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(next(run_dir.rglob("last.pt")), map_location="cpu", weights_only=False)["model"]


@pytest.mark.parametrize("sharing", EXPERTS)
def test_resumed_run_equals_an_uninterrupted_one(tmp_path: Path, sharing: str) -> None:
    # A constant learning rate: the run cut after one epoch then plans the same steps as
    # the two-epoch run (a cosine schedule would stretch over the planned epochs).
    values: dict[str, Any] = {"trainer.lr_schedule": "constant"}
    if sharing == "dselect_k":
        values["sharing.entropy_reg"] = 0.01
    whole = run_experiment(_config("small_cnn", sharing, {**values, "trainer.epochs": 2}), tmp_path / "whole")
    run_experiment(_config("small_cnn", sharing, {**values, "trainer.epochs": 1}), tmp_path / "part")
    resumed = run_experiment(
        _config("small_cnn", sharing, {**values, "trainer.epochs": 2, "resume": str(tmp_path / "part")}), tmp_path / "part"
    )
    assert resumed["resumed"] is True and resumed["steps"] == whole["steps"]
    assert resumed["test_losses"] == whole["test_losses"]
    got, want = _final_state(tmp_path / "part"), _final_state(tmp_path / "whole")
    assert list(got) == list(want)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("sharing", EXPERTS)
def test_trains_the_multi_input_dataset(tmp_path: Path, sharing: str) -> None:
    cfg = compose_config([
        "dataset=linear_tasks", "dataset.num_tasks=3", "backbone=linear", "trainer.epochs=2", "trainer.batch_size=10",
        "trainer.progress=off", "trainer.device=cpu", "baseline=off", f"sharing={sharing}",
        *(["sharing.num_levels=1"] if sharing == "ple" else []),  # backbone=linear has one stage
    ])
    results = run_experiment(cfg, tmp_path)
    assert results["status"] == "completed" and results["steps"] == 6
    assert all(torch.isfinite(torch.tensor(v)) for v in results["test_losses"].values())


def test_a_searched_tree_trains_as_a_fixed_tree_from_the_search_run(tmp_path: Path) -> None:
    """The paper's two phases as two runs: the search's tree (``results.json``) fixed, its
    weights loaded by name; the fixed model has exactly the size the search reported."""
    search = run_experiment(_config("small_cnn", "learning_to_branch"), tmp_path / "search")
    tree = search["parameters"]["tree"]
    fixed = run_experiment(
        _config("small_cnn", "learning_to_branch", {"sharing.tree": tree, "init_from": str(tmp_path / "search")}),
        tmp_path / "fixed",
    )
    assert fixed["status"] == "completed" and fixed["parameters"]["tree"] == tree
    assert fixed["parameters"]["mtl"] == search["parameters"]["tree_parameters"] < search["parameters"]["mtl"]
