"""A real TensorBoard server over a two-job sweep shows what a user compares."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts import tb_screenshots
from tests.conftest import TINY, run_cli

pytestmark = pytest.mark.slow  # a real server over a real sweep


def test_tensorboard_serves_sweep_runs_tags_and_hparams(tmp_path: Path) -> None:
    result = run_cli(["-m", *TINY, "diagnostics.every_n_steps=1", "baseline=on",
                      "balancer=uniform,uncertainty", "surgery=none,pcgrad"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    sweep = next((tmp_path / "outputs" / "multirun").iterdir())

    expected = [f"balancer={b},surgery={s}" for b in ("uncertainty", "uniform") for s in ("none", "pcgrad")]
    with tb_screenshots.tensorboard(sweep, expected) as base:
        runs = tb_screenshots.get_json(f"{base}/data/runs")
        assert sorted(runs) == expected  # type: ignore[arg-type]

        tags = tb_screenshots.get_json(f"{base}/data/plugin/scalars/tags")
        for run in runs:
            run_tags = set(tags[run])  # type: ignore[index]
            for tag in ("cos/seg~depth", "weight/seg", "loss/train/depth", "metric/val/seg/miou"):
                assert tag in run_tags, (run, tag)

        layout = tb_screenshots.get_json(f"{base}/data/plugin/custom_scalars/layout")
        charts = {c["title"]: [chart["title"] for chart in c["chart"]] for c in layout["category"]}  # type: ignore[index]
        assert "cos seg~depth" in charts["gradient cosines"] and len(charts["gradient cosines"]) == 3  # one per pair
        assert "grad_norm depth" in charts["gradient norms"]  # per task: no shared linear axis

        experiment = tb_screenshots.get_json(f"{base}/data/plugin/hparams/experiment", {"experimentName": ""})
        infos = experiment["hparamInfos"]  # type: ignore[index]
        assert [(h["name"], h.get("differs", False)) for h in infos[:2]] == [("balancer", True), ("surgery", True)]
        assert sorted(infos[1]["domainDiscrete"]) == ["none", "pcgrad"]
        assert not any(h.get("differs", False) for h in infos[2:])
        assert {"dataset", "backbone", "sharing", "optimizer.lr", "trainer.seed"} <= {h["name"] for h in infos[2:]}
        assert next(h for h in infos if h["name"] == "optimizer.lr").get("type") == "DATA_TYPE_FLOAT64"
        metric_tags = [m["name"]["tag"] for m in experiment["metricInfos"]]  # type: ignore[index]
        assert {"hparam/delta_m_pct", "hparam/test/seg/miou", "hparam/test/depth/abs_err"} <= set(metric_tags)
        assert metric_tags[:2] == ["hparam/delta_m_pct", "hparam/val/delta_m_pct"]  # the first metric columns in view

        groups = tb_screenshots.get_json(f"{base}/data/plugin/hparams/session_groups", {
            "experimentName": "", "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS"],
            "colParams": [{"hparam": "balancer"}, {"hparam": "surgery"},
                          {"metric": {"tag": "hparam/delta_m_pct"}}],
            "startIndex": 0, "sliceSize": 10, "aggregationType": "AGGREGATION_AVG",
        })
        sessions = [s for g in groups["sessionGroups"] for s in g["sessions"]]  # type: ignore[index]
        assert len(sessions) == 4
        for session in sessions:
            final_step = json.loads((sweep / session["name"] / "results.json").read_text())["steps"]
            delta_m = next(m for m in session["metricValues"] if m["name"]["tag"] == "hparam/delta_m_pct")
            assert delta_m["trainingStep"] == final_step  # at the run's last step, not at 0
