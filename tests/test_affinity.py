"""mtl-affinity: the three measures, the grouping search and the command end to end."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mtl_runner.affinity.cka import linear_cka
from mtl_runner.affinity.command import run_affinity
from mtl_runner.affinity.grouping import EXHAUSTIVE_MAX_TASKS, best_grouping, set_partitions
from mtl_runner.config import validate
from tests.conftest import TINY, compose_config

pytestmark = pytest.mark.usefixtures("one_thread")


def run_affinity_cli(args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """``mtl-affinity ARGS`` through its installed console script, as a user types it."""
    script = Path(sys.executable).with_name("mtl-affinity")
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(script), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


# ------------------------------------------------------------------ CKA
def _orthogonal(p: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(p, p, generator=gen, dtype=torch.float64))
    return q


def test_cka_is_one_for_identical_representations_and_invariant() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 12, generator=gen, dtype=torch.float64)
    y = x @ torch.randn(12, 12, generator=gen, dtype=torch.float64) + 0.5 * torch.randn(64, 12, generator=gen, dtype=torch.float64)
    assert float(linear_cka(x, x)) == pytest.approx(1.0, abs=1e-12)
    reference = float(linear_cka(x, y))
    assert float(linear_cka(x @ _orthogonal(12, gen), y)) == pytest.approx(reference, abs=1e-10)
    assert float(linear_cka(x, y @ _orthogonal(12, gen))) == pytest.approx(reference, abs=1e-10)
    assert float(linear_cka(3.7 * x, 0.2 * y)) == pytest.approx(reference, abs=1e-10)
    # The Gram form equals the feature-space form ||Yc^T Xc||^2 / (||Xc^T Xc|| ||Yc^T Yc||).
    xc, yc = x - x.mean(0), y - y.mean(0)
    feature_form = (yc.T @ xc).norm() ** 2 / ((xc.T @ xc).norm() * (yc.T @ yc).norm())
    assert reference == pytest.approx(float(feature_form), abs=1e-10)


def test_cka_is_low_for_unrelated_representations_and_takes_feature_maps() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(256, 8, generator=gen)
    y = torch.randn(256, 8, generator=gen)
    assert float(linear_cka(x, y)) < 0.2
    maps = torch.randn(32, 4, 5, 5, generator=gen)
    assert float(linear_cka(maps, maps.flatten(1))) == pytest.approx(1.0, abs=1e-9)


# ------------------------------------------------------------- grouping
def _brute_force_best(a: torch.Tensor, k: int) -> float:
    """Independent reference: every labelling of the tasks with at most k labels, scored
    directly from the objective's definition."""
    n = len(a)
    best = -float("inf")
    for labels in itertools.product(range(k), repeat=n):
        scores = []
        for j in range(n):
            mates = [i for i in range(n) if i != j and labels[i] == labels[j]]
            if mates:
                scores.append(sum(float(a[i, j]) for i in mates) / len(mates))
            else:
                others = [float(a[j, i]) for i in range(n) if i != j] + [float(a[i, j]) for i in range(n) if i != j]
                scores.append(sum(others) / len(others))
        best = max(best, sum(scores) / n)
    return best


@pytest.mark.parametrize(("n", "k", "seed"), [(4, 2, 0), (5, 2, 1), (5, 3, 2), (6, 3, 3), (6, 1, 4)])
def test_grouping_search_finds_the_brute_force_optimum(n: int, k: int, seed: int) -> None:
    a = torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    found = best_grouping(a, k)
    assert found.method == "exhaustive"
    assert len(found.groups) <= k and sorted(i for g in found.groups for i in g) == list(range(n))
    assert found.score == pytest.approx(_brute_force_best(a, k), abs=1e-12)


def test_set_partitions_counts_are_stirling_sums() -> None:
    assert sum(1 for _ in set_partitions(5, 5)) == 52  # Bell(5)
    assert sum(1 for _ in set_partitions(5, 2)) == 16  # S(5,1) + S(5,2)
    assert sum(1 for _ in set_partitions(8, 8)) == 4140  # Bell(8)


def test_planted_groups_are_recovered_exhaustively_and_by_clustering() -> None:
    for n in (6, EXHAUSTIVE_MAX_TASKS + 4):
        truth = [list(range(0, n // 2)), list(range(n // 2, n))]
        a = torch.full((n, n), -0.5, dtype=torch.float64)
        for group in truth:
            for i in group:
                for j in group:
                    a[i, j] = 1.0
        a += 0.05 * torch.randn(n, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
        found = best_grouping(a, 2)
        assert sorted(sorted(g) for g in found.groups) == truth, found
        assert found.method == ("exhaustive" if n <= EXHAUSTIVE_MAX_TASKS else "average-linkage")


# ------------------------------------------------- measures on dataset=controlled
CONTROLLED = [
    "dataset=controlled", "backbone=mlp", "backbone.hidden=[32]", "dataset.num_train=256", "dataset.num_val=64",
    "dataset.num_test=64", "trainer.batch_size=32", "trainer.device=cpu", "trainer.progress=off", "baseline=off",
    "optimizer.lr=0.01", "affinity.steps=16", "affinity.lookahead_lr=0.1", "affinity.measures=[gradient,lookahead]",
]


def _affinity(tmp_path: Path, alpha: float) -> dict:
    from hydra import compose, initialize_config_dir

    from mtl_runner.cli import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("mtl_affinity", overrides=[*CONTROLLED, f"dataset.alpha={alpha}"])
    validate(cfg)
    return run_affinity(cfg, tmp_path / f"alpha{alpha}")


def test_gradient_and_lookahead_affinity_order_aligned_tasks_above_orthogonal(tmp_path: Path) -> None:
    orthogonal, aligned = _affinity(tmp_path, 0.0), _affinity(tmp_path, 1.0)
    for measure in ("gradient", "lookahead"):
        low, high = orthogonal["measures"][measure]["matrix"], aligned["measures"][measure]["matrix"]
        assert high[0][1] > low[0][1] and high[1][0] > low[1][0], (measure, low, high)
    # Identical targets: once the heads have started to fit, a step for one task helps the other.
    assert aligned["measures"]["gradient"]["matrix"][0][1] > 0.1
    assert aligned["measures"]["lookahead"]["matrix"][0][1] > 0.0


# ----------------------------------------------------------- the command
@pytest.mark.slow
def test_mtl_affinity_end_to_end_writes_json_pngs_and_tensorboard(tmp_path: Path) -> None:
    out = tmp_path / "aff"
    result = run_affinity_cli(
        [*TINY, "dataset.image_size=16", "dataset.num_train=32", "dataset.num_val=16", "dataset.num_test=16", "trainer.device=cpu",
         "diagnostics=off", "+aux=rotation", "affinity.steps=2", "affinity.cka_examples=8",
         f"baseline.root={tmp_path / 'baselines'}", f"hydra.run.dir={out}"],
        cwd=tmp_path, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    written = json.loads((out / "affinity.json").read_text())
    assert set(written["measures"]) == {"gradient", "lookahead", "cka"}
    assert written["measures"]["gradient"]["tasks"] == ["seg", "depth", "count", "rotation"]
    assert written["measures"]["cka"]["tasks"] == ["seg", "depth", "count"]  # no baseline for the aux task
    for measure in written["measures"].values():
        groups = measure["grouping"]["groups"]
        assert 1 <= len(groups) <= 2 and sorted(t for g in groups for t in g) == sorted(measure["tasks"])
    for measure in ("gradient", "lookahead", "cka"):
        assert (out / f"heatmap_{measure}.png").stat().st_size > 0
        assert (out / f"dendrogram_{measure}.png").stat().st_size > 0
    assert list((out / "tb").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_mtl_affinity_bad_option_is_a_one_line_error(tmp_path: Path) -> None:
    result = run_affinity_cli(["affinity.measures=[gradient,nope]"], cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "affinity.measures" in lines[0] and "lookahead" in lines[0], result.stderr
    assert not (tmp_path / "outputs").exists()


def test_lookahead_matches_a_step_on_a_copied_model() -> None:
    """Z from the engine's Jacobian and functional_call equals the definition computed the
    slow way: copy the model, step its shared parameters on task i, evaluate task j."""
    import copy

    from mtl_runner import build
    from mtl_runner.affinity.gradient import GradientAffinity
    from mtl_runner.affinity.lookahead import LookaheadAffinity
    from mtl_runner.assemble import build_run

    cfg = compose_config([o for o in CONTROLLED if not o.startswith("affinity.")] + ["dataset.alpha=0.5"])
    taskset = build.build_taskset(cfg)
    torch.manual_seed(0)
    model = build.build_model(cfg, taskset)
    trainer = build_run(cfg, None, taskset=taskset, model=model, callbacks=[GradientAffinity(1)], diagnostics=False).trainer
    lookahead = LookaheadAffinity(trainer, lr=0.1, every_n_steps=1)
    batch = next(iter(taskset.train.batches(32, shuffle=False, generator=None, device=torch.device("cpu"))))
    before_model = copy.deepcopy(model)
    before = lookahead.snapshot()
    grads = trainer.train_step(batch).grads
    z = lookahead.measure(before, batch, grads.jacobian)

    x, y = batch
    def losses(m: torch.nn.Module) -> torch.Tensor:
        out = m(x)
        return torch.stack([t.loss(out[t.name], y[t.name]) for t in taskset.tasks]).double()

    base = losses(before_model).detach()
    expected = torch.zeros(2, 2, dtype=torch.float64)
    for i in range(2):
        shared = list(before_model.shared_parameters())
        g = torch.autograd.grad(losses(before_model)[i], shared)
        stepped = copy.deepcopy(before_model)
        with torch.no_grad():
            for p, gp in zip(stepped.shared_parameters(), g):
                p -= 0.1 * gp
            expected[i] = 1 - losses(stepped) / base
    assert torch.allclose(z, expected, rtol=1e-4, atol=1e-6), (z, expected)
    assert not torch.equal(expected[0], torch.zeros(2, dtype=torch.float64))
