"""A real TensorBoard server over a two-job sweep shows what a user compares."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import TINY, run_cli

pytestmark = pytest.mark.slow  # a real server over a real sweep

STARTUP_TIMEOUT_S = 90


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, body: dict | None = None) -> object:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_tensorboard_serves_sweep_runs_tags_and_hparams(tmp_path: Path) -> None:
    result = run_cli(["-m", *TINY, "diagnostics.every_n_steps=1", "baseline=on",
                      "balancer=uniform,uncertainty", "surgery=none,pcgrad"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    sweep = next((tmp_path / "outputs" / "multirun").iterdir())

    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(sweep), "--host", "127.0.0.1",
         "--port", str(port), "--load_fast=false", "--reload_interval=1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        runs: list[str] = []
        while time.monotonic() < deadline:
            try:
                runs = _get(f"{base}/data/runs")  # type: ignore[assignment]
                if len(runs) >= 4:
                    break
            except OSError:
                pass
            time.sleep(1)
        assert sorted(runs) == [f"balancer={b},surgery={s}" for b in ("uncertainty", "uniform") for s in ("none", "pcgrad")]

        tags = _get(f"{base}/data/plugin/scalars/tags")
        for run in runs:
            run_tags = set(tags[run])  # type: ignore[index]
            for tag in ("cos/seg~depth", "weight/seg", "loss/train/depth", "metric/val/seg/miou"):
                assert tag in run_tags, (run, tag)

        layout = _get(f"{base}/data/plugin/custom_scalars/layout")
        charts = {c["title"]: [chart["title"] for chart in c["chart"]] for c in layout["category"]}  # type: ignore[index]
        assert "cos seg~depth" in charts["gradient cosines"] and len(charts["gradient cosines"]) == 3  # one per pair
        assert "grad_norm depth" in charts["gradient norms"]  # per task: no shared linear axis

        experiment = _get(f"{base}/data/plugin/hparams/experiment", {"experimentName": ""})
        infos = experiment["hparamInfos"]  # type: ignore[index]
        assert [(h["name"], h.get("differs", False)) for h in infos[:2]] == [("balancer", True), ("surgery", True)]
        assert sorted(infos[1]["domainDiscrete"]) == ["none", "pcgrad"]
        assert not any(h.get("differs", False) for h in infos[2:])
        assert {"dataset", "backbone", "sharing", "optimizer.lr", "trainer.seed"} <= {h["name"] for h in infos[2:]}
        assert next(h for h in infos if h["name"] == "optimizer.lr").get("type") == "DATA_TYPE_FLOAT64"
        metric_tags = [m["name"]["tag"] for m in experiment["metricInfos"]]  # type: ignore[index]
        assert {"hparam/delta_m_pct", "hparam/test/seg/miou", "hparam/test/depth/abs_err"} <= set(metric_tags)
        assert metric_tags[:2] == ["hparam/delta_m_pct", "hparam/val/delta_m_pct"]  # the first metric columns in view

        groups = _get(f"{base}/data/plugin/hparams/session_groups", {
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
    finally:
        server.terminate()
        server.wait(timeout=30)
