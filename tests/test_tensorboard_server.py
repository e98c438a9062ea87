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
    result = run_cli(["-m", *TINY, "diagnostics.every_n_steps=1", "optimizer.lr=0.002,0.001"], cwd=tmp_path)
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
                if len(runs) >= 2:
                    break
            except OSError:
                pass
            time.sleep(1)
        assert sorted(r.split("/")[0] for r in runs) == ["0_optimizer.lr=0.002", "1_optimizer.lr=0.001"]

        tags = _get(f"{base}/data/plugin/scalars/tags")
        for run in runs:
            run_tags = set(tags[run])  # type: ignore[index]
            for tag in ("cos/seg~depth", "weight/seg", "loss/train/depth", "metric/val/seg/miou"):
                assert tag in run_tags, (run, tag)

        experiment = _get(f"{base}/data/plugin/hparams/experiment", {"experimentName": ""})
        names = {h["name"] for h in experiment["hparamInfos"]}  # type: ignore[index]
        assert {"dataset", "backbone", "sharing", "balancer", "surgery", "lr", "seed"} <= names
        lr_values = next(h for h in experiment["hparamInfos"] if h["name"] == "lr")  # type: ignore[index]
        assert lr_values.get("type") == "DATA_TYPE_FLOAT64"
    finally:
        server.terminate()
        server.wait(timeout=30)
