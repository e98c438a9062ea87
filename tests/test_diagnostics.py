"""Conflict diagnostics: cosines from known gradients, the decision rule, TensorBoard output."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mtl_runner import diagnostics
from mtl_runner.diagnostics import ConflictDiagnostics, PairStats, custom_scalars_layout, fraction_bar, pair_stats, recommend
from mtl_runner.models.sharing.base import SharingModel
from mtl_runner.optim.balancers.uniform import Uniform
from mtl_runner.optim.jacobian import GradientEngine, StepGradients
from mtl_runner.optim.surgery.none import NoSurgery
from mtl_runner.preflight import preflight
from mtl_runner.runner import run_experiment
from mtl_runner.tasks import Task
from mtl_runner.train.logger import RunLogger
from tests.conftest import TINY, compose_config


class LinearProbe(SharingModel):
    """Task t outputs a_t . theta, so L_t = (a_t . theta)^2 has gradient 2 (a_t . theta) a_t."""

    def __init__(self, directions: torch.Tensor) -> None:
        tasks = [Task(f"t{i}", "regression", 1) for i in range(len(directions))]
        super().__init__(tasks)
        self.theta = torch.nn.Parameter(torch.ones(directions.shape[1]))
        self.directions = directions

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.directions @ self.theta
        return {name: out[i].reshape(1, 1) for i, name in enumerate(self.task_names)}

    def shared_parameters(self) -> list[torch.nn.Parameter]:
        return [self.theta]

    def task_parameters(self, task: str) -> list[torch.nn.Parameter]:
        return []


def test_cosines_equal_hand_computed_values(tmp_path: Path) -> None:
    a = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [-1.0, 2.0, 0.0]])
    model = LinearProbe(a)
    balancer = Uniform()
    balancer.setup(model.tasks, None)
    engine = GradientEngine(model, balancer, NoSurgery(), "sequential")
    diag = ConflictDiagnostics(model.task_names, every_n_steps=1, warmup_steps=0, run_dir=tmp_path)
    logger = RunLogger(tmp_path / "tb")
    trainer = SimpleNamespace(logger=logger, state=SimpleNamespace(step=1, last_step=1))

    out = engine.forward(torch.zeros(1))
    losses = torch.stack([(out[t] ** 2).sum() for t in model.task_names])
    grads = engine.backward(losses, balancer.weights(losses), need_jacobian=diag.wants_jacobian(0))
    diag.on_step(trainer, 0, losses.detach(), torch.ones(3), grads)  # type: ignore[arg-type]
    diag.on_epoch_end(trainer, 0)  # type: ignore[arg-type]
    diag.on_fit_end(trainer)  # type: ignore[arg-type]
    logger.close()

    # g_t = 2 (a_t . 1) a_t: the signs of a_t . 1 are +, +, + -> cosines are those of the a_t
    expected = {"t0~t1": 1 / math.sqrt(2), "t0~t2": -1 / math.sqrt(5), "t1~t2": 1 / math.sqrt(10)}
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    for pair, value in expected.items():
        assert acc.Scalars(f"cos/{pair}")[0].value == pytest.approx(value, abs=1e-6)
    assert acc.Scalars("conflict/t0~t2")[0].value == 1.0
    assert acc.Scalars("conflict/t0~t1")[0].value == 0.0
    norms = {t: acc.Scalars(f"grad_norm/{t}")[0].value for t in model.task_names}
    assert norms["t1"] == pytest.approx(2 * 2 * math.sqrt(2), rel=1e-6)
    report = json.loads((tmp_path / "diagnostics.json").read_text())["final"]
    assert report["pairs"]["t0~t2"]["frac_negative"] == 1.0


# Two tasks whose gradients conflict (cosine -1) on the steps listed and agree (+1) on the others.
CONFLICTING = {1, 2, 5, 12}


def _drive(diag: ConflictDiagnostics, trainer: SimpleNamespace, steps: range, steps_per_epoch: int) -> None:
    """Call the callback as the trainer does, with known per-task gradients."""
    for step in steps:
        trainer.state.last_step = step
        if diag.wants_jacobian(step):
            rows = torch.tensor([[1.0, 0.0], [-1.0 if step in CONFLICTING else 1.0, 0.0]])
            diag.on_step(trainer, step, torch.ones(2), torch.ones(2), StepGradients(jacobian=rows))  # type: ignore[arg-type]
        if step % steps_per_epoch == steps_per_epoch - 1:
            diag.on_epoch_end(trainer, step // steps_per_epoch)  # type: ignore[arg-type]


def _feed(diag: ConflictDiagnostics, tmp_path: Path, steps: int, steps_per_epoch: int) -> EventAccumulator:
    logger = RunLogger(tmp_path / "tb")
    trainer = SimpleNamespace(logger=logger, state=SimpleNamespace(step=0, last_step=0))
    _drive(diag, trainer, range(steps), steps_per_epoch)
    diag.on_fit_end(trainer)  # type: ignore[arg-type]
    logger.close()
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_dense_phase_then_sparse_schedule_windows_and_recent_fraction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every step of the dense phase, then every ``every_n_steps``; a histogram closes when
    its window is full or the dense phase ends; ``conflict_recent`` is the fraction of
    negative cosines over the last window of diagnostics steps, at every one of them."""
    monkeypatch.setattr(diagnostics, "HISTOGRAM_WINDOW", 4)
    diag = ConflictDiagnostics(("a", "b"), every_n_steps=4, warmup_steps=5, run_dir=tmp_path, dense_steps=6)
    acc = _feed(diag, tmp_path, steps=20, steps_per_epoch=10)

    diagnosed = [0, 1, 2, 3, 4, 5, 8, 12, 16]
    assert [e.step for e in acc.Scalars("cos/a~b")] == diagnosed
    negative = [step in CONFLICTING for step in diagnosed]
    recent = [sum(negative[max(0, i - 3): i + 1]) / len(negative[max(0, i - 3): i + 1]) for i in range(len(diagnosed))]
    assert [e.value for e in acc.Scalars("conflict_recent/a~b")] == pytest.approx(recent)
    # full window (0-3), the dense phase's end (4-5), the run's end (8, 12, 16)
    assert [(e.step, e.histogram_value.num) for e in acc.Histograms("cos_hist/a~b")] == [(3, 4), (5, 2), (19, 3)]
    # per epoch, each diagnostics step weighted by the training steps up to the next one (as in
    # the report below): steps 0-4 and 5 (to 8) and 8 (to 12), 5 of 12 negative; then 12 and 16
    assert [(e.step, e.value) for e in acc.Scalars("conflict/a~b")] == [(9, pytest.approx(5 / 12)), (19, 0.5)]
    table = acc.Tensors("conflict_report/epoch/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "**epoch 1**" in table and "from 7 diagnostics steps" in table
    assert f"| a~b | 42% | `{fraction_bar(5 / 12)}` |" in table
    report = json.loads((tmp_path / "diagnostics.json").read_text())
    assert report["warmup"]["step"] == 4 and report["warmup"]["pairs"]["a~b"]["steps"] == 5  # the steps before step 5
    assert report["warmup"]["pairs"]["a~b"]["frac_negative"] == pytest.approx(2 / 5)
    # the final report weighs each diagnostics step by the training steps up to the next one:
    # steps 0-4 one each, step 5 three (to 8), steps 8, 12, 16 four each; negative: 1, 2, 5, 12
    final = report["final"]["pairs"]["a~b"]
    assert final["steps"] == 9 and final["frac_negative"] == pytest.approx((1 + 1 + 3 + 4) / 20)


def test_report_statistics_with_equal_weights_are_the_plain_ones() -> None:
    cosines = torch.tensor([0.3, -0.2, 0.9, -0.5, 0.1])
    for weights in (None, torch.full((5,), 10.0)):
        stats = pair_stats(cosines, weights)
        assert stats.mean == pytest.approx(float(cosines.double().mean()))
        assert stats.std == pytest.approx(float(cosines.double().std()))
        assert stats.frac_negative == pytest.approx(0.4) and stats.steps == 5
    weighted = pair_stats(torch.tensor([1.0, -1.0]), torch.tensor([3.0, 1.0]))
    assert weighted.mean == pytest.approx(0.5) and weighted.frac_negative == pytest.approx(0.25)


def test_a_resumed_callback_reports_as_an_uninterrupted_one(tmp_path: Path) -> None:
    """The weights of the logged steps are checkpoint state; a checkpoint written before
    they existed (every entry every_n_steps apart) loads with equal weights."""
    def make(run_dir: Path) -> ConflictDiagnostics:
        return ConflictDiagnostics(("a", "b"), every_n_steps=4, warmup_steps=0, run_dir=run_dir, dense_steps=6)

    trainer = SimpleNamespace(logger=RunLogger(None), state=SimpleNamespace(step=0, last_step=0))
    whole, first = make(tmp_path / "whole"), make(tmp_path / "resumed")
    for path in (tmp_path / "whole", tmp_path / "resumed"):
        path.mkdir()
    _drive(whole, trainer, range(20), steps_per_epoch=10)
    whole.on_fit_end(trainer)  # type: ignore[arg-type]
    _drive(first, trainer, range(10), steps_per_epoch=10)
    resumed = make(tmp_path / "resumed")
    resumed.load_state_dict(first.state_dict())
    _drive(resumed, trainer, range(10, 20), steps_per_epoch=10)
    resumed.on_fit_end(trainer)  # type: ignore[arg-type]
    read = [json.loads((tmp_path / d / "diagnostics.json").read_text())["final"]["pairs"] for d in ("whole", "resumed")]
    assert read[0] == read[1]

    old_checkpoint = {key: value for key, value in first.state_dict().items() if key != "spans"}
    older = make(tmp_path)
    older.load_state_dict(old_checkpoint)
    assert older.state_dict()["spans"] == [4] * len(old_checkpoint["all"])


def test_every_n_steps_0_turns_the_dense_phase_off_too() -> None:
    diag = ConflictDiagnostics(("a", "b"), every_n_steps=0, warmup_steps=0, run_dir=None, dense_steps=200)
    assert not any(diag.wants_jacobian(step) for step in range(300))


def test_without_a_dense_phase_the_schedule_is_every_n_steps_from_step_0() -> None:
    diag = ConflictDiagnostics(("a", "b"), every_n_steps=10, warmup_steps=0, run_dir=None)
    assert [step for step in range(35) if diag.wants_jacobian(step)] == [0, 10, 20, 30]


def test_fraction_bar_has_eighth_character_resolution() -> None:
    assert fraction_bar(0.0) == ""
    assert fraction_bar(1.0) == "█" * diagnostics.BAR_WIDTH
    assert fraction_bar(0.5) == "█" * (diagnostics.BAR_WIDTH // 2)
    assert fraction_bar(1 / 16) == "█▎"  # 1.25 characters of 20


def test_custom_scalars_chart_the_dense_conflict_fractions() -> None:
    layout = custom_scalars_layout(("a", "b", "c"))
    charts = layout[f"conflict fraction (last {diagnostics.HISTOGRAM_WINDOW} diagnostics steps)"]
    assert charts["conflict a~c"] == ["Multiline", ["^conflict_recent/a\\~c$"]]
    assert len(charts) == 3


def test_negative_dense_steps_is_a_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        preflight(["diagnostics.dense_steps=-1"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "diagnostics.dense_steps" in lines[0] and "an integer >= 0" in lines[0], lines


def _stats(mean: float, std: float, frac: float) -> PairStats:
    return PairStats(mean=mean, std=std, frac_negative=frac, steps=50)


@pytest.mark.parametrize(
    ("pairs", "ratio", "finding", "advice"),
    [
        ([_stats(-0.05, 0.3, 0.45)], 2.0, "structural conflict", "cagrad"),
        ([_stats(-0.05, 0.3, 0.45)] * 7, 2.0, "structural conflict", "surgery=pcgrad"),
        ([_stats(0.02, 0.05, 0.01)], 2.0, "nearly orthogonal", "sharing"),
        ([_stats(0.6, 0.2, 0.0)], 40.0, "scale problem", "uncertainty or balancer=gradnorm"),
        ([_stats(-0.05, 0.3, 0.45)], 40.0, "conflict and scale mismatch", "balancer=gradnorm surgery=pcgrad"),
        ([_stats(0.95, 0.02, 0.0)], 2.0, "aligned", "surgery is wasted"),
        ([_stats(0.3, 0.2, 0.1)], 2.0, "mild conflict", "uniform"),
    ],
)
def test_decision_rule_outcomes(pairs: list[PairStats], ratio: float, finding: str, advice: str) -> None:
    num_tasks = 3 if len(pairs) == 1 else 8
    got_finding, got_advice = recommend({f"p{i}": s for i, s in enumerate(pairs)}, ratio, num_tasks)
    assert finding in got_finding
    assert advice in got_advice


@pytest.mark.slow
def test_run_writes_conflict_report(tmp_path: Path) -> None:
    """Through mtl-run's own wiring: the default dense phase diagnoses each of the 4 steps
    although every_n_steps=3, and every diagnostics output is written."""
    run_experiment(compose_config([*TINY, "diagnostics.every_n_steps=3", "diagnostics.warmup_steps=2"]), tmp_path)
    report = json.loads((tmp_path / "diagnostics.json").read_text())
    assert set(report) == {"warmup", "final"}
    assert set(report["final"]["pairs"]) == {"seg~depth", "seg~count", "depth~count"}
    assert report["final"]["recommendation"]
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("cos/seg~depth")] == [0, 1, 2, 3]
    assert [e.step for e in acc.Scalars("conflict_recent/seg~depth")] == [0, 1, 2, 3]
    assert "cos_hist/seg~depth" in acc.Tags()["histograms"]
    assert "conflict_report/epoch/text_summary" in acc.Tags()["tensors"]


# ------------------------------------------------- the controlled conflict experiment
@pytest.mark.parametrize("alpha", [-0.6, 0.0, 0.3, 0.7, 1.0])
def test_controlled_maps_have_cosine_alpha_and_equal_norms(alpha: float) -> None:
    from mtl_runner.data.controlled import controlled_maps

    w1, w2 = controlled_maps(alpha, d=32, k=4, seed=3)
    cosine = torch.dot(w1.flatten(), w2.flatten()) / (w1.norm() * w2.norm())
    assert abs(cosine.item() - alpha) < 1e-12
    assert abs(w1.norm().item() - w2.norm().item()) < 1e-12
    same_first, _ = controlled_maps(0.1, d=32, k=4, seed=3)
    assert torch.equal(w1, same_first)  # alpha moves W_2 only


def test_controlled_targets_are_the_maps_applied_to_the_inputs() -> None:
    """Without noise, least squares on the training split recovers both maps, and their
    recovered cosine is alpha: the data carries the conflict the config asks for."""
    from mtl_runner.data.controlled import controlled, controlled_maps

    taskset = controlled(alpha=0.3, d=16, k=3, noise=0.0, num_train=64, num_val=4, num_test=4, seed=1)
    x, targets = taskset.train.inputs.double(), taskset.train.targets
    fitted = [torch.linalg.lstsq(x, targets[name].double()).solution.T for name in ("t1", "t2")]
    for fit, truth in zip(fitted, controlled_maps(0.3, d=16, k=3, seed=1)):
        assert torch.allclose(fit, truth, atol=1e-5)
    cosine = torch.dot(fitted[0].flatten(), fitted[1].flatten()) / (fitted[0].norm() * fitted[1].norm())
    assert abs(cosine.item() - 0.3) < 1e-5


def test_controlled_rejects_bad_alpha_and_k() -> None:
    from mtl_runner.data.controlled import controlled

    with pytest.raises(ValueError, match=r"dataset\.alpha must be in \[-1, 1\]"):
        controlled(alpha=1.5)
    with pytest.raises(ValueError, match=r"dataset\.k=40 is too large for dataset\.d=64"):
        controlled(k=40)
