"""mtl-report over seeds: the interval by hand, the paired verdict on constructed cases,
and the grouped table of a 2 configurations x 3 seeds sweep."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from mtl_runner import seeds
from mtl_runner.report import main

#: t_{0.975, 2}, from a printed table of Student's t quantiles.
T_975_DF2 = 4.303


def test_interval_matches_a_hand_computation() -> None:
    values = [1.0, 2.0, 4.0]
    mean = 7 / 3
    sd = math.sqrt(((1 - mean) ** 2 + (2 - mean) ** 2 + (4 - mean) ** 2) / 2)
    got = seeds.estimate(values)
    assert got is not None and got.n == 3 and got.mean == pytest.approx(mean)
    assert got.half_width == pytest.approx(T_975_DF2 * sd / math.sqrt(3), rel=1e-3)
    assert str(got) == f"+2.33 ± {T_975_DF2 * sd / math.sqrt(3):.2f}"
    one = seeds.estimate([5.0])
    assert one is not None and one.half_width is None and str(one) == "+5.00"
    assert seeds.estimate([]) is None


def test_paired_verdicts_on_constructed_cases() -> None:
    reference = {"0": -10.0, "1": -4.0, "2": -7.0}  # seeds spread widely: only pairing sees the gain
    consistently_better = {"0": -8.0, "1": -1.9, "2": -5.1}
    assert seeds.paired_comparison(consistently_better, reference).verdict == "better"
    consistently_worse = {"0": -12.0, "1": -6.2, "2": -8.8}
    assert seeds.paired_comparison(consistently_worse, reference).verdict == "worse"
    noisy = {"0": -7.0, "1": -6.0, "2": -6.5}  # mean +0.5, differences +3, -2, +0.5
    comparison = seeds.paired_comparison(noisy, reference)
    assert comparison.verdict == "no significant difference" and comparison.p_value > 0.05
    assert seeds.paired_comparison({"0": 1.0}, {"0": 0.0}).verdict == "too few paired seeds"
    assert seeds.paired_comparison({"5": 1.0}, reference) is None


def _job(root: Path, name: str, balancer: str, seed: int, val: float, test: float) -> None:
    job = root / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(f"- balancer={balancer}\n- trainer.seed={seed}\n")
    (job / ".hydra" / "hydra.yaml").write_text(
        f"hydra:\n  runtime:\n    choices:\n      balancer: {balancer}\n      surgery: none\n")
    (job / "results.json").write_text(json.dumps({
        "status": "completed", "delta_m_pct": test, "val": {"delta_m_pct": val},
        "tasks": {"a": {"delta_pct_mean": test}}, "config": {"trainer": {"seed": seed}},
    }))


def test_report_groups_a_two_by_three_seed_sweep(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    uniform_val, famo_val = [-10.0, -4.0, -7.0], [-8.0, -1.9, -5.1]
    for seed in range(3):
        _job(tmp_path, f"{2 * seed}_balancer=uniform,trainer.seed={seed}", "uniform", seed, uniform_val[seed], -12.0 + seed)
        _job(tmp_path, f"{2 * seed + 1}_balancer=famo,trainer.seed={seed}", "famo", seed, famo_val[seed], -3.0 - seed)
    out_md = tmp_path / "report.md"
    main([str(tmp_path), "--markdown", str(out_md)])
    printed = capsys.readouterr().out
    famo = seeds.estimate(famo_val)
    lines = [line for line in printed.splitlines() if line.startswith("| balancer=")]
    assert [line.split(" | ")[0] for line in lines] == ["| balancer=famo", "| balancer=uniform"]  # by mean val Δm
    assert f" | {famo} | " in lines[0] and lines[0].endswith("| better |") and lines[1].endswith("| reference |")
    assert "Significantly better than the reference (balancer=uniform) on val Δm: balancer=famo." in printed
    assert "Seed groups" in out_md.read_text()

    # The same sweep against famo: nothing beats it, and the report says so.
    main([str(tmp_path), "--reference", "1_balancer=famo,trainer.seed=0"])
    printed = capsys.readouterr().out
    assert "No configuration is significantly better than the reference (balancer=famo)" in printed
