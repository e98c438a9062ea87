"""mtl-advise: the screening end to end on tiny data, and its rule against constructed results."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtl_runner import advise, seeds
from tests.test_baselines import VECTOR


def _group(label: str, val: list[float]) -> seeds.SeedGroup:
    group = seeds.SeedGroup(label=label, overrides={})
    group.val_delta_m = {str(i): v for i, v in enumerate(val)}
    return group


def test_a_rule_candidate_measured_worse_than_uniform_is_named_and_not_recommended() -> None:
    uniform = _group("balancer=uniform surgery=none", [-10.0, -4.0, -7.0])
    gradnorm = _group("balancer=gradnorm surgery=none", [-30.0, -25.0, -27.0])
    famo = _group("balancer=famo surgery=none", [-9.9, -4.2, -6.9])
    summaries = seeds.summarise([uniform, gradnorm, famo], uniform, "val")
    text = advise._markdown(["dataset=controlled"], 2, [0, 1, 2], "scale problem (losses differ 20x)",
                            "balancer=uncertainty or balancer=gradnorm before any surgery",
                            [("balancer=gradnorm", "surgery=none")], summaries, uniform, 60.0)
    assert "The rule's candidate `balancer=gradnorm surgery=none` measured worse than uniform" in text
    assert "No configuration is significantly better than the reference" in text
    assert "mtl-run -m dataset=controlled balancer=uniform surgery=none trainer.seed=0,1,2" in text
    assert "no candidate beat uniform significantly" in text


@pytest.mark.slow
def test_screening_runs_and_ends_in_a_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    problem = [o for o in VECTOR if not o.startswith(("trainer.epochs", "diagnostics"))]
    problem += ["diagnostics.every_n_steps=2", "diagnostics.warmup_steps=0", f"baseline.root={tmp_path / 'cache'}"]
    advise.main([*problem, "--epochs", "1", "--out", str(tmp_path / "advice")])
    text = (tmp_path / "advice" / "advice.md").read_text()
    assert "Diagnostics (uniform, 1 epoch)" in text and "| balancer=famo surgery=none | 2 |" in text
    assert "balancer=uniform surgery=pcgrad" in text and "\n    mtl-run -m " in text
    assert capsys.readouterr().out.strip().endswith("trainer.seed=0,1,2")


def test_overrides_that_the_screening_chooses_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        advise.main(["balancer=famo"])
    assert exit_info.value.code == 2 and "mtl-advise chooses balancer" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        advise.main(["dataset=no_such_dataset"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "no_such_dataset" in err
