"""Single-task baselines: deltas and Δm, the cache key, the lock, corrupt entries, results.json."""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import pytest
import torch

from mtl_runner import baselines, build
from mtl_runner.baselines import cache_key, compare, delta_pct, ensure_baseline, load_baseline_model, read_record
from mtl_runner.runner import run_experiment
from tests.conftest import compose_config

#: Two vector regression tasks and a one-layer MLP: a baseline trains in well under a second.
VECTOR = [
    "dataset=controlled", "dataset.num_train=64", "dataset.num_val=32", "dataset.num_test=32", "dataset.d=16",
    "dataset.k=2", "backbone=mlp", "backbone.hidden=[16]", "trainer.epochs=1", "trainer.batch_size=16",
    "trainer.progress=off", "diagnostics=off",
]


def _cfg(root: Path, *extra: str):
    return compose_config([*VECTOR, f"baseline.root={root}", *extra])


# ---------------------------------------------------------------- deltas and Δm
def test_delta_pct_is_direction_aware() -> None:
    assert delta_pct(0.8, 0.75, higher_is_better=True) == pytest.approx(6.666667, rel=1e-6)
    assert delta_pct(0.9, 1.0, higher_is_better=False) == pytest.approx(10.0)  # lower error: better
    assert delta_pct(1.2, 1.0, higher_is_better=False) == pytest.approx(-20.0)
    assert delta_pct(0.7, 0.75, higher_is_better=True) == pytest.approx(-6.666667, rel=1e-6)
    assert delta_pct(0.5, 0.0, higher_is_better=True) is None
    assert delta_pct(float("nan"), 1.0, higher_is_better=True) is None


def test_delta_m_averages_all_metrics_and_skips_auxiliary_tasks() -> None:
    tasks = {
        "a": {"auxiliary": False, "metrics": {"accuracy": {"mtl": 0.8, "higher_is_better": True}}},
        "b": {"auxiliary": False, "metrics": {"mse": {"mtl": 0.9, "higher_is_better": False},
                                               "mae": {"mtl": 1.2, "higher_is_better": False}}},
        "c": {"auxiliary": True, "metrics": {"accuracy": {"mtl": 0.5, "higher_is_better": True}}},
    }
    stl = {"a": {"accuracy": 0.75}, "b": {"mse": 1.0, "mae": 1.0}, "c": {"accuracy": 1.0}}
    delta_m = compare(tasks, stl)
    # (+6.667 + 10 - 20) / 3: each metric counts once; the auxiliary task's -50 does not count.
    assert delta_m == pytest.approx((100 * 0.05 / 0.75 + 10.0 - 20.0) / 3)
    assert tasks["a"]["metrics"]["accuracy"]["stl"] == 0.75
    assert tasks["b"]["metrics"]["mae"]["delta_pct"] == pytest.approx(-20.0)
    assert tasks["b"]["delta_pct_mean"] == pytest.approx(-5.0)
    assert tasks["c"]["delta_pct_mean"] == pytest.approx(-50.0)
    assert compare({"c": tasks["c"]}, {"c": {"accuracy": 1.0}}) is None  # only auxiliary tasks: no Δm


# ---------------------------------------------------------------- cache key
def test_cache_key_ignores_method_choices_and_follows_what_determines_the_baseline(tmp_path: Path) -> None:
    base = cache_key(_cfg(tmp_path), "t1")
    for same in (["balancer=uncertainty"], ["surgery=none", "balancer=gradnorm"], ["sharing=none"],
                 ["diagnostics=default"], ["trainer.log_every_n_steps=3", "trainer.checkpoint_every_n_steps=2"],
                 ["trainer.device=cpu", "trainer.eval_batch_size=7"], [f"baseline.root={tmp_path}/elsewhere"]):
        assert cache_key(_cfg(tmp_path, *same), "t1") == base, same
    for different in (["backbone.hidden=[32]"], ["trainer.epochs=2"], ["trainer.seed=1"], ["optimizer.lr=0.01"],
                      ["trainer.batch_size=8"], ["dataset.alpha=0.9"], ["trainer.lr_schedule=constant"]):
        assert cache_key(_cfg(tmp_path, *different), "t1") != base, different
    assert cache_key(_cfg(tmp_path), "t2") != base


# ---------------------------------------------------------------- the cache
def _ensure_in_subprocess(root: str, queue: multiprocessing.Queue) -> None:
    torch.set_num_threads(1)
    record = ensure_baseline(_cfg(Path(root)), "t1")
    queue.put((record.trained_now, record.metrics))


@pytest.mark.slow
def test_two_processes_train_one_baseline_once(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=_ensure_in_subprocess, args=(str(tmp_path), queue)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=240)
    assert [worker.exitcode for worker in workers] == [0, 0]
    answers = [queue.get(timeout=10) for _ in workers]
    assert sorted(trained for trained, _ in answers) == [False, True]
    assert answers[0][1] == answers[1][1]
    entries = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(entries) == 1 and len(list(entries[0].glob("events.out.tfevents.*"))) == 1  # one training wrote events


@pytest.mark.slow
def test_partial_or_corrupt_entries_are_rebuilt(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    first = ensure_baseline(cfg, "t1")
    assert first.trained_now and first.checkpoint_path.is_file()
    cached = ensure_baseline(cfg, "t1")
    assert not cached.trained_now and cached.metrics == first.metrics and cached.wall_time_s == first.wall_time_s

    record_file = first.directory / baselines.RECORD_FILE
    record_file.write_text(record_file.read_text()[:40])  # killed while writing the record
    assert read_record(first.directory) is None
    rebuilt = ensure_baseline(cfg, "t1")
    assert rebuilt.trained_now and rebuilt.metrics == first.metrics

    data = first.checkpoint_path.read_bytes()
    first.checkpoint_path.write_bytes(data[: len(data) // 2])  # a truncated checkpoint
    assert read_record(first.directory) is None
    assert ensure_baseline(cfg, "t1").trained_now

    record_file.unlink()  # killed during training: no record at all
    assert ensure_baseline(cfg, "t1").trained_now
    assert read_record(first.directory) is not None


def test_loaded_baseline_model_reproduces_its_test_metrics(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    record = ensure_baseline(cfg, "t2")
    model = load_baseline_model(record)
    assert sum(p.numel() for p in model.parameters()) == record.num_parameters
    single = build.build_taskset(cfg).only("t2")
    task = single.tasks[0]
    accumulator = task.accumulator(torch.device("cpu"))
    with torch.no_grad():
        for inputs, targets in single.test.batches(8, shuffle=False, generator=None, device=torch.device("cpu")):
            accumulator.update(model(inputs)["t2"], targets["t2"])
    assert accumulator.compute() == pytest.approx(record.metrics, rel=1e-5)


# ---------------------------------------------------------------- in results.json
@pytest.mark.slow
def test_run_with_baselines_writes_the_comparison_and_reuses_the_cache(tmp_path: Path) -> None:
    # sharing=none trains each task's column exactly as its baseline: Δm must be ~0.
    started = time.perf_counter()
    separate = run_experiment(_cfg(tmp_path / "cache", "sharing=none"), tmp_path / "none")
    elapsed = time.perf_counter() - started
    assert separate["delta_m_pct"] == pytest.approx(0.0, abs=1e-3)
    # The MTL run's wall time leaves out the baselines trained on the way.
    assert separate["wall_time_s"] + separate["baselines"]["trained_this_run_s"] <= elapsed
    assert separate["parameters"]["stl_sum"] == separate["parameters"]["mtl"]
    assert separate["baselines"]["trained_this_run_s"] > 0

    hard = run_experiment(_cfg(tmp_path / "cache", "balancer=uncertainty"), tmp_path / "hard")
    assert hard["baselines"]["trained_this_run_s"] == 0.0  # both baselines came from the cache
    assert all(entry["cached"] for entry in hard["baselines"]["tasks"].values())
    assert hard["baselines"]["wall_time_s"] == pytest.approx(separate["baselines"]["wall_time_s"])
    assert hard["forward_passes_per_input"] == 1 and hard["baselines"]["forward_passes_per_input"] == 2
    stored = json.loads((tmp_path / "hard" / "results.json").read_text())
    mse = stored["tasks"]["t1"]["metrics"]["mse"]
    assert set(mse) >= {"mtl", "stl", "higher_is_better", "delta_pct", "trivial"}
    assert mse["delta_pct"] == pytest.approx(-(mse["mtl"] - mse["stl"]) / mse["stl"] * 100)
    deltas = [m["delta_pct"] for t in stored["tasks"].values() for m in t["metrics"].values()]
    assert stored["delta_m_pct"] == pytest.approx(sum(deltas) / len(deltas))
    assert "Δm" in (tmp_path / "hard" / "results.md").read_text()


def test_baseline_off_reports_no_comparison(tmp_path: Path) -> None:
    out = run_experiment(_cfg(tmp_path / "cache", "baseline=off"), tmp_path / "run")
    assert "delta_m_pct" not in out and "stl" not in out["tasks"]["t1"]["metrics"]["mse"]
    assert not (tmp_path / "cache").exists()
