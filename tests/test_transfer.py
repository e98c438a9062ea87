"""Transfer affinity: A's baseline encoder fine-tuned on B vs B from scratch."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from rich.console import Console
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mtl_runner import build
from mtl_runner.affinity.command import run_affinity
from mtl_runner.affinity.transfer import transfer_affinity, transfer_gain_pct
from mtl_runner.cli import CONF_DIR
from mtl_runner.config import validate
from mtl_runner.tasks import Task
from tests.conftest import compose_config

pytestmark = pytest.mark.usefixtures("one_thread")

#: dataset=controlled, small enough for a few seconds per matrix.
CONTROLLED = [
    "dataset=controlled", "backbone=mlp", "backbone.hidden=[64,64]", "dataset.d=32", "dataset.k=4",
    "dataset.num_train=256", "dataset.num_val=32", "dataset.num_test=256",
    "trainer.epochs=2", "trainer.batch_size=32", "trainer.progress=off", "baseline=on",
]


def _matrix(root: Path, alpha: float, out_dir: Path | None = None) -> torch.Tensor:
    cfg = compose_config([*CONTROLLED, f"dataset.alpha={alpha}", f"baseline.root={root}"])
    names, gains = transfer_affinity(cfg, build.build_taskset(cfg), out_dir, Console(quiet=True))
    assert names == ["t1", "t2"]
    return gains


def test_gain_is_signed_mean_relative_change() -> None:
    accuracy = Task("c", "classification", 3)  # accuracy: higher is better
    assert transfer_gain_pct(accuracy, {"accuracy": 0.9}, {"accuracy": 0.6}) == pytest.approx(50.0)
    regression = Task("r", "regression", 1)  # mse and mae: lower is better
    tuned, scratch = {"mse": 0.8, "mae": 1.5}, {"mse": 1.0, "mae": 1.0}
    assert transfer_gain_pct(regression, tuned, scratch) == pytest.approx((20.0 - 50.0) / 2)
    assert math.isnan(transfer_gain_pct(regression, tuned, {"mse": 0.0, "mae": 0.0}))


def test_identical_tasks_transfer_more_than_orthogonal_ones(tmp_path: Path) -> None:
    orthogonal = _matrix(tmp_path / "cache", alpha=0.0)
    identical = _matrix(tmp_path / "cache", alpha=1.0, out_dir=tmp_path / "out")
    assert identical[0, 0] == 0 and identical[1, 1] == 0
    assert identical[0, 1] > orthogonal[0, 1] + 1.0 and identical[1, 0] > orthogonal[1, 0] + 1.0
    assert identical[0, 1] > 0 and identical[1, 0] > 0, "starting from the same task must beat a random start"

    record = json.loads((tmp_path / "out" / "transfer.json").read_text())
    assert record["gain_pct"] == identical.tolist()
    pair = next(p for p in record["pairs"] if p["source"] == "t1" and p["target"] == "t2")
    report = json.loads((Path(pair["entry"]) / "init_report.json").read_text())
    assert report["source"] == record["scratch"]["t1"]["entry"]
    assert all(name.startswith("encoder.") for name in report["loaded"]) and report["loaded"]
    assert {r["name"].split(".")[1] for r in report["reinitialised"]} == {"t2"}, "t2's head starts fresh"
    assert {r["name"].split(".")[1] for r in report["skipped"]} == {"t1"}, "t1's head is not used"

    # a second measurement reuses every cached training and gives the same matrix
    entries = sorted(p.name for p in (tmp_path / "cache").iterdir())
    again = _matrix(tmp_path / "cache", alpha=1.0)
    assert torch.equal(again, identical) and sorted(p.name for p in (tmp_path / "cache").iterdir()) == entries


def test_mtl_affinity_writes_the_transfer_matrix(tmp_path: Path) -> None:
    overrides = [*CONTROLLED, "dataset.alpha=1.0", f"baseline.root={tmp_path / 'cache'}",
                 "affinity.measures=[gradient]", "affinity.steps=4", "affinity.transfer=true"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("mtl_affinity", overrides=overrides)
    validate(cfg)
    out_dir = tmp_path / "affinity"
    measures = run_affinity(cfg, out_dir, Console(quiet=True))["measures"]
    assert set(measures) == {"gradient", "transfer"}
    transfer = measures["transfer"]
    assert transfer["tasks"] == ["t1", "t2"] and transfer["matrix"][0][1] > 0 and transfer["matrix"][1][0] > 0
    assert transfer["grouping"]["groups"] == [["t1", "t2"]], "tasks that transfer to each other share an encoder"
    assert json.loads((out_dir / "affinity.json").read_text())["measures"]["transfer"]["matrix"] == transfer["matrix"]
    assert (out_dir / "heatmap_transfer.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert json.loads((out_dir / "transfer.json").read_text())["gain_pct"] == transfer["matrix"]
    events = EventAccumulator(str(out_dir / "tb"), size_guidance={"images": 0})
    events.Reload()
    assert "affinity/heatmap/transfer" in events.Tags()["images"]
