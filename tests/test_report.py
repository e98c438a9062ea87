"""mtl-report over a real tiny sweep (with a failed job), its table, files, plot and errors."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest

from mtl_runner.errors import ReportError
from mtl_runner.report import JobRow, build_table, collect, main, to_markdown
from tests.conftest import run_cli
from tests.test_baselines import VECTOR

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def report(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``mtl-report ARGS`` in this process: (exit code, stdout, stderr)."""
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three jobs: two complete, one whose loss blows up (learning rate 1e30, stop on NaN)."""
    cwd = tmp_path_factory.mktemp("sweep")
    result = run_cli(["-m", *VECTOR, "trainer.on_nonfinite=stop", "optimizer.lr=0.001,0.01,1e30"],
                     cwd=cwd, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 1, result.stderr  # a failed job makes the sweep exit non-zero
    (sweep_dir,) = (cwd / "outputs" / "multirun").iterdir()
    return sweep_dir


@pytest.mark.slow
def test_report_prints_sorted_table_and_marks_the_failures(sweep: Path) -> None:
    # The installed entry point, as a user runs it.
    result = subprocess.run([str(Path(sys.executable).parent / "mtl-report"), str(sweep)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = next(line for line in lines if "job" in line and "status" in line)
    for column in ("job", "status", "optimizer.lr", "Δt1 %", "Δt2 %", "Δm val %", "Δm test %"):
        assert column in header
    job_lines = [line for line in lines if line.startswith("│")]
    assert len(job_lines) == 3
    assert [("failed" in line) for line in job_lines] == [False, False, True]  # no Δm: last
    assert "NonFiniteError" in result.stdout

    rows = collect([sweep])
    completed = [r for r in rows if r.status == "completed"]
    table = build_table(rows)
    assert [r.val_delta_m for r in table.rows[:2]] == sorted((r.val_delta_m for r in completed), reverse=True)
    for row in completed:
        stored = json.loads((row.path / "results.json").read_text())
        assert row.delta_m == stored["delta_m_pct"] and row.val_delta_m == stored["val"]["delta_m_pct"]
        assert row.task_deltas["t1"] == stored["tasks"]["t1"]["delta_pct_mean"]


@pytest.mark.slow
def test_report_writes_csv_markdown_and_a_valid_png(sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_csv, out_md, out_png = tmp_path / "r.csv", tmp_path / "r.md", tmp_path / "dm.png"
    code, _, err = report([str(sweep), "--csv", str(out_csv), "--markdown", str(out_md), "--plot", str(out_png),
                           "--sort", "optimizer.lr"], capsys)
    assert code == 0, err
    with out_csv.open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["optimizer.lr"] for r in rows] == ["0.001", "0.01", "1e+30"]
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["Δm test %"] == "" and "NonFiniteError" in failed[0]["error"]
    assert out_md.read_text().startswith("| job | status |")
    assert out_png.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(out_png)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_unfinished_jobs_and_sorting(tmp_path: Path) -> None:
    job = tmp_path / "sweep" / "0_balancer=uniform"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("- balancer=uniform\n- trainer.progress=off\n")
    (rows,) = [collect([tmp_path])]
    assert rows[0].status == "unfinished" and rows[0].overrides == {"balancer": "uniform"}

    made = [JobRow("a", tmp_path, "completed", {"x": "1"}, {"t": -3.0}, -3.0),
            JobRow("b", tmp_path, "failed", {"x": "2"}, {}, None, "boom"),
            JobRow("c", tmp_path, "completed", {"x": "10"}, {"t": 5.0}, 5.0)]
    assert [r.name for r in build_table(made, "delta_m").rows] == ["c", "a", "b"]  # best Δm first, none last
    assert [r.name for r in build_table(made, "t").rows] == ["c", "a", "b"]
    assert [r.name for r in build_table(made, "x").rows] == ["a", "b", "c"]  # 1 < 2 < 10: numbers
    markdown = to_markdown(build_table(made))
    assert "| c | completed | 10 | +5.00 | - | +5.00 |" in markdown and "| b | failed | 2 | - | - | - |" in markdown
    with pytest.raises(ReportError, match="--sort nope"):
        build_table(made, "nope")


def test_bad_paths_fail_with_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = report([str(tmp_path / "missing")], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1 and "missing: no such directory" in err
    (tmp_path / "empty").mkdir()
    code, _, err = report([str(tmp_path / "empty")], capsys)
    assert code == 2 and "no mtl-run job found" in err
    code, _, err = report([str(tmp_path / "empty"), "--plot", str(tmp_path / "x.jpg")], capsys)
    assert code == 2 and "--plot" in err
    code, _, err = report([str(tmp_path / "empty"), "--csv", str(tmp_path / "no" / "r.csv")], capsys)
    assert code == 2 and "does not exist" in err
    assert not (tmp_path / "x.jpg").exists() and not (tmp_path / "no").exists()
