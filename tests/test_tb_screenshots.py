"""scripts/tb_screenshots.py without a browser (CI has none): the runs it waits for, and
the one-line error when no browser is there."""

from __future__ import annotations

from pathlib import Path

import pytest

from scripts import tb_screenshots


def test_the_runs_waited_for_are_the_directories_holding_events(tmp_path: Path) -> None:
    for job in ("balancer=uniform,surgery=none", "balancer=uncertainty,surgery=pcgrad"):
        (tmp_path / job).mkdir()
        (tmp_path / job / "events.out.tfevents.1.host").write_bytes(b"")
    (tmp_path / "balancer=uniform,surgery=none" / ".hydra").mkdir()
    (tmp_path / "failed_before_logging").mkdir()  # no events: TensorBoard shows no run for it
    assert tb_screenshots.job_runs(tmp_path) == ["balancer=uncertainty,surgery=pcgrad", "balancer=uniform,surgery=none"]


def test_a_missing_browser_is_one_line_naming_the_option() -> None:
    with pytest.raises(SystemExit, match=r"^--chromium: no no-such-browser on PATH; install one"):
        tb_screenshots.find_chromium("no-such-browser")
