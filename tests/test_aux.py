"""Auxiliary tasks: +aux=rotation wraps any square-image dataset; auxiliary tasks train and
log but stay out of Δm and the headline metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mtl_runner import baselines, build, results
from mtl_runner.cli import CONF_DIR
from mtl_runner.config import validate
from mtl_runner.data.auxiliary.rotation import rotate, rotation
from mtl_runner.data.synthetic_scenes import synthetic_scenes
from mtl_runner.runner import run_experiment
from tests.conftest import TINY, compose_config, run_cli


def _tiny_scenes():
    return synthetic_scenes(image_size=16, num_train=24, num_val=12, num_test=12)


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF_DIR / "aux").glob("*.yaml")))
def test_every_aux_option_composes_and_validates(option: str) -> None:
    validate(compose_config([f"+aux={option}"]))


def test_rotate_turns_each_image_by_its_own_quarter_turns() -> None:
    x = torch.randn(8, 3, 5, 5)
    turns = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    out = rotate(x, turns)
    for i, k in enumerate(turns.tolist()):
        assert torch.equal(out[i], torch.rot90(x[i], k, dims=(-2, -1)))


def test_rotation_wrapper_adds_an_auxiliary_task_and_consistent_batches() -> None:
    base = _tiny_scenes()
    wrapped = rotation(base, name="rot", seed=3)
    assert wrapped.task_names == (*base.task_names, "rot")
    assert [t.auxiliary for t in wrapped.tasks] == [False, False, False, True]
    assert wrapped.multi_input and wrapped.input_shape == base.input_shape
    gen = torch.Generator().manual_seed(0)
    batches = list(wrapped.train.batches(10, shuffle=True, generator=gen, device=torch.device("cpu")))
    assert sum(len(y["rot"]) for _, y in batches) == len(base.train)
    for inputs, targets in batches:
        main = inputs["seg"]
        assert inputs["depth"] is main and inputs["count"] is main  # one forward serves them
        assert torch.equal(inputs["rot"], rotate(main, targets["rot"]))
    # The same seed draws the same rotations; evaluation rotations are fixed.
    again = list(wrapped.train.batches(10, shuffle=True, generator=torch.Generator().manual_seed(0), device=torch.device("cpu")))
    assert all(torch.equal(a[1]["rot"], b[1]["rot"]) for a, b in zip(batches, again))
    val = [torch.cat([y["rot"] for _, y in wrapped.val.batches(5, shuffle=False, generator=None, device=torch.device("cpu"))]) for _ in range(2)]
    assert torch.equal(val[0], val[1]) and val[0].unique().numel() > 1


def test_main_tasks_see_the_same_batches_with_and_without_the_aux_task() -> None:
    base = _tiny_scenes()
    wrapped = rotation(base)
    cpu = torch.device("cpu")
    gen_plain, gen_wrapped = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for _ in range(2):  # two epochs: the data generator's stream is left untouched
        plain = list(base.train.batches(8, shuffle=True, generator=gen_plain, device=cpu))
        aux = list(wrapped.train.batches(8, shuffle=True, generator=gen_wrapped, device=cpu))
        for (x, y), (xa, ya) in zip(plain, aux):
            assert torch.equal(x, xa["seg"]) and torch.equal(y["count"], ya["count"])
    assert torch.equal(gen_plain.get_state(), gen_wrapped.get_state())


def test_rotation_refuses_non_image_datasets() -> None:
    from mtl_runner.data.controlled import controlled

    with pytest.raises(ValueError, match="aux=rotation needs square image inputs"):
        rotation(controlled(num_train=8, num_val=8, num_test=8))


def test_tasks_sharing_one_input_share_one_encoder_pass() -> None:
    cfg = compose_config(TINY)
    wrapped = rotation(_tiny_scenes())
    model = build.build_model(cfg, wrapped)
    calls = []
    model.encoder.register_forward_hook(lambda *_: calls.append(1))
    inputs, _ = next(iter(wrapped.val.batches(4, shuffle=False, generator=None, device=torch.device("cpu"))))
    out = model.predict(inputs)
    assert set(out) == set(wrapped.task_names)
    assert len(calls) == 2  # the shared batch once, the rotated copy once
    assert out["rotation"].shape == (4, 4)


def test_auxiliary_task_changes_nothing_in_delta_m() -> None:
    base = _tiny_scenes()
    wrapped = rotation(base)
    mtl = {t.name: {m.name: 0.5 + 0.1 * i for i, m in enumerate(t.metrics)} for t in wrapped.tasks}
    stl = {t.name: {m.name: 0.4 for m in t.metrics} for t in wrapped.tasks}
    without = results.task_results(base.tasks, {k: mtl[k] for k in base.task_names}, mtl)
    with_aux = results.task_results(wrapped.tasks, mtl, mtl)
    assert with_aux["rotation"]["auxiliary"] is True
    delta_without = baselines.compare(without, {k: stl[k] for k in base.task_names})
    delta_with = baselines.compare(with_aux, stl)  # even a baseline given for the aux task is ignored
    assert delta_with == pytest.approx(delta_without)
    flat = results.final_metrics({"tasks": with_aux})
    assert flat and not any("/rotation/" in key for key in flat)


def test_rotation_trains_end_to_end_with_main_aux_weights(tmp_path: Path) -> None:
    cfg = compose_config([
        *TINY, "dataset.image_size=16", "+aux=rotation", "baseline=off", "diagnostics=off",
        "balancer=static", "balancer.main=seg", "balancer.aux_weight=0.2", "trainer.device=cpu",
    ])
    validate(cfg)
    out = run_experiment(cfg, tmp_path)
    assert out["status"] == "completed"
    assert out["tasks"]["rotation"]["auxiliary"] is True
    assert not out["tasks"]["seg"]["auxiliary"]
    assert 0.0 <= out["tasks"]["rotation"]["metrics"]["accuracy"]["mtl"] <= 1.0
    assert torch.isfinite(torch.tensor(out["test_losses"]["rotation"]))
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["tasks"]["rotation"]["auxiliary"] is True
    assert "rotation (aux)" in (tmp_path / "results.md").read_text()


@pytest.mark.slow
def test_rotation_on_a_vector_dataset_is_a_one_line_error(tmp_path: Path) -> None:
    result = run_cli(["dataset=controlled", "backbone=mlp", "+aux=rotation", "baseline=off", "trainer.progress=off"], cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "aux=rotation needs square image inputs" in lines[0], result.stderr
