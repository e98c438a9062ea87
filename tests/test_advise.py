"""mtl-advise: the screening end to end on tiny data, its budget plan against made-up timings,
the trainer's batch cap the plan sets, and its rule against constructed results."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mtl_runner import advise, seeds
from mtl_runner.assemble import build_run
from mtl_runner.baselines import ensure_baseline
from mtl_runner.checkpoints import last_checkpoint
from mtl_runner.config import validate
from mtl_runner.errors import ConfigError
from tests.conftest import compose_config
from tests.test_baselines import VECTOR

COSTS = advise.StepCosts(plain_step=1.0, gradient_step=2.0, eval_example=0.01, run_setup=1.0)
#: 10 plain and 6 per-task-gradient trainings of 2 epochs of 63 batches, 1600 examples evaluated each:
#: 16 x (1 + 16) = 272 s whatever the batches, and 2 x (10 x 1 + 6 x 2) = 44 s per batch.
WORK = advise.Workload(plain_runs=10, gradient_runs=6, epochs=2, full_batches=63, eval_examples=1600)


def test_the_plan_gives_every_run_the_batches_that_fill_the_budget() -> None:
    plan = advise.plan_screening(1000.0, COSTS, WORK)  # (0.9 x 1000 - 272) / 44 = 14.3
    assert (plan.batches, plan.cap, plan.fits, plan.trainings) == (14, 14, True, 16)
    assert plan.seconds == pytest.approx(272 + 14 * 44)
    assert plan.describe(10, 60).startswith("Budget 10 min: 2 epochs x 14 of 63 batches (22%) per run")


def test_the_plan_keeps_whole_epochs_when_they_fit_or_without_a_budget() -> None:
    for seconds_left in (100_000.0, None):
        plan = advise.plan_screening(seconds_left, COSTS, WORK)
        assert (plan.batches, plan.cap, plan.fits) == (63, None, True)
    assert "2 epochs x all 63 batches per run" in advise.plan_screening(None, COSTS, WORK).describe(0, 60)


def test_a_budget_too_small_for_the_minimum_says_which_budget_fits() -> None:
    plan = advise.plan_screening(300.0, COSTS, WORK)  # 0.9 x 300 < 272: not even one batch
    assert (plan.batches, plan.cap, plan.fits) == (advise.MIN_BATCHES, advise.MIN_BATCHES, False)
    text = plan.describe(6, 60)  # (60 + (272 + 10 x 44) / 0.9) / 60 = 14.2 min
    assert text.startswith("--budget 6 is too small here") and "give --budget 15," in text and "\n" not in text
    tiny = advise.Workload(plain_runs=1, gradient_runs=0, epochs=1, full_batches=4, eval_examples=10)
    assert advise.plan_screening(0.0, COSTS, tiny).cap is None  # the minimum is the whole (short) epoch


@pytest.mark.slow
def test_max_batches_per_epoch_caps_the_steps_and_the_schedule_counts_the_capped_epoch(tmp_path: Path) -> None:
    problem = [*VECTOR, "trainer.epochs=2", f"baseline.root={tmp_path / 'cache'}"]  # 4 batches of 16 per epoch
    cfg = compose_config([*problem, "trainer.max_batches_per_epoch=3"])
    run = build_run(cfg, None)
    run.trainer.fit()
    assert run.trainer.state.step == 6 and len(run.trainer.state.history) == 2
    assert run.trainer.scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)  # the cosine's end: 6 of 6 steps
    record = ensure_baseline(cfg, "t1")  # baselines are built from the same config
    assert torch.load(last_checkpoint(record.directory), weights_only=False)["state"]["step"] == 6
    with pytest.raises(ConfigError, match="trainer.max_batches_per_epoch=0 is not allowed"):
        validate(compose_config([*problem, "trainer.max_batches_per_epoch=0"]))


def _group(label: str, val: list[float]) -> seeds.SeedGroup:
    group = seeds.SeedGroup(label=label, overrides={})
    group.val_delta_m = {str(i): v for i, v in enumerate(val)}
    return group


def test_a_rule_candidate_measured_worse_than_uniform_is_named_and_not_recommended() -> None:
    uniform = _group("balancer=uniform surgery=none", [-10.0, -4.0, -7.0])
    gradnorm = _group("balancer=gradnorm surgery=none", [-30.0, -25.0, -27.0])
    famo = _group("balancer=famo surgery=none", [-9.9, -4.2, -6.9])
    summaries = seeds.summarise([uniform, gradnorm, famo], uniform, "val")
    diagnosis = ("uniform, 40 batches", "scale problem (losses differ 20x)", "balancer=uncertainty or balancer=gradnorm before any surgery")
    text = advise._markdown(["dataset=controlled"], [0, 1, 2], diagnosis, [("balancer=gradnorm", "surgery=none")],
                            summaries, uniform, "Budget 10 min: ...")
    assert "The rule's candidate `balancer=gradnorm surgery=none` measured worse than uniform" in text
    assert "No configuration is significantly better than the reference" in text
    assert "mtl-run -m dataset=controlled balancer=uniform surgery=none trainer.seed=0,1,2" in text
    assert "no candidate beat uniform significantly" in text


@pytest.mark.slow
def test_screening_runs_and_ends_in_a_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    problem = [o for o in VECTOR if not o.startswith(("trainer.epochs", "diagnostics"))]
    advise.main([*problem, f"baseline.root={tmp_path / 'cache'}", "--epochs", "1", "--out", str(tmp_path / "advice")])
    text = (tmp_path / "advice" / "advice.md").read_text()
    assert "Diagnostics (uniform, 4 batches," in text and "The whole screening took" in text
    assert "Budget 10 min: 1 epoch x all 4 batches per run" in text
    assert "**no diagnostics**" not in text and "| balancer=famo surgery=none | 2 |" in text
    assert "balancer=uniform surgery=pcgrad" in text and "\n    mtl-run -m " in text
    out = capsys.readouterr().out
    assert out.strip().endswith("trainer.seed=0,1,2")
    # One line per screening run, not each run's own summary (its files are still written).
    progress = [line for line in out.splitlines() if line.startswith("[")]
    assert len(progress) == 8 and progress[0].startswith("[1/8] balancer=uniform,surgery=none,seed=0: validation Δm ")
    assert "test metrics:" not in out
    assert (tmp_path / "advice" / "balancer=famo,surgery=none,seed=1" / "results.md").is_file()


@pytest.mark.slow
def test_a_budget_that_cannot_fit_the_minimum_is_refused_after_the_diagnose_run(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    problem = [o for o in VECTOR if not o.startswith(("trainer.epochs", "diagnostics"))]
    with pytest.raises(SystemExit) as exit_info:
        advise.main([*problem, f"baseline.root={tmp_path / 'cache'}", "--budget", "0.001", "--out", str(tmp_path / "advice")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("mtl-advise: error: --budget 0.001 is too small here")
    assert (tmp_path / "advice" / "diagnose" / "diagnostics.json").is_file() and not (tmp_path / "cache").exists()


def test_overrides_that_the_screening_chooses_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    for chosen in ("balancer=famo", "trainer.max_batches_per_epoch=5", "diagnostics.every_n_steps=2"):
        with pytest.raises(SystemExit) as exit_info:
            advise.main([chosen])
        assert exit_info.value.code == 2 and "mtl-advise chooses balancer" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        advise.main(["dataset=no_such_dataset"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "no_such_dataset" in err
