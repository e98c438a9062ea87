"""Failures a user can cause end in one line and a resumable state (issue 20): signals,
quoted paths, non-finite weights, ``+`` keys, optimizer arguments, damaged dataset files,
unwritable outputs, damaged results for mtl-report, and the smaller error messages."""

from __future__ import annotations

import gzip
import json
import os
import shlex
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from mtl_runner import cli, io
from mtl_runner.data.multimnist import read_idx
from mtl_runner.errors import DatasetRootError
from mtl_runner.preflight import override, preflight
from mtl_runner.report import load_job
from mtl_runner.runner import run_experiment
from mtl_runner.train import interrupt
from mtl_runner.train.nonfinite import NonFiniteError
from tests.conftest import TINY, compose_config
from tests.test_datasets import write_mnist

#: Enough steps (4 per epoch, 2 epochs) that a signal lands mid-run.
TWO_EPOCHS = [*TINY, "trainer.epochs=2"]


def mtl_run(args: list[str], cwd: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``mtl-run ARGS`` in this process, from ``cwd``: (exit code, stderr)."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["mtl-run", *args])
    try:
        cli.run()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


def preflight_exit(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """The preflight of ``mtl-run ARGS``: (0, '') when it passes, else (2, its line)."""
    try:
        preflight(args)
    except SystemExit as exc:
        return int(exc.code or 0), capsys.readouterr().err
    return 0, capsys.readouterr().err


def signal_at_step(monkeypatch: pytest.MonkeyPatch, step: int, *signums: int) -> None:
    """Send this process ``signums`` after training step ``step``, as a user or a
    scheduler would from outside."""
    original = interrupt.StopAtSafePoint.on_train_batch_end

    def with_signal(self: interrupt.StopAtSafePoint, trainer, outcome) -> None:  # type: ignore[no-untyped-def]
        if outcome.step == step:
            for signum in signums:
                os.kill(os.getpid(), signum)
        original(self, trainer, outcome)

    monkeypatch.setattr(interrupt.StopAtSafePoint, "on_train_batch_end", with_signal)


# ------------------------------------------------------------- 1, 2: signals
@pytest.fixture
def interactive_sigint() -> Iterator[None]:
    """SIGINT handled as in a terminal, even in a test process started with it ignored (a
    background job): mtl-run keeps an ignored signal ignored."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_a_signal_the_process_ignores_stays_ignored_during_training() -> None:
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        requests = interrupt.StopRequests()
        with requests.active():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) == requests.handle
            os.kill(os.getpid(), signal.SIGINT)
        assert requests.signum is None
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


@pytest.mark.slow
@pytest.mark.usefixtures("interactive_sigint")
def test_ctrl_c_stops_at_a_step_with_a_checkpoint_and_a_resume_command_that_works(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "my run, ü"  # a space, a comma, non-ASCII: all of it must survive quoting
    with monkeypatch.context() as patched:
        signal_at_step(patched, 2, signal.SIGINT)
        code, err = mtl_run([*TWO_EPOCHS, override("hydra.run.dir", str(run_dir))], tmp_path, patched, capsys)
    assert code == 130
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "SIGINT at epoch 1, step 3" in lines[0] and "checkpoint saved" in lines[0], err
    assert json.loads((run_dir / "results.json").read_text())["status"] == "interrupted"
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["state"]["step"] == 3

    command = shlex.split(lines[0].split("resume with: ", 1)[1])
    assert command[0] == "mtl-run"
    code, err = mtl_run(command[1:], tmp_path, monkeypatch, capsys)
    assert code == 0, err
    got = json.loads((run_dir / "results.json").read_text())  # equal to an uninterrupted run: scripts/chaos.py
    assert got["status"] == "completed" and got["resumed"] is True and got["steps"] == 8


@pytest.mark.slow
@pytest.mark.usefixtures("interactive_sigint")
def test_sigterm_exits_143_a_requeued_job_resumes_and_a_second_ctrl_c_exits_at_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    args = [*TWO_EPOCHS, f"hydra.run.dir={tmp_path / 'job'}"]
    handler_before = signal.getsignal(signal.SIGINT)
    with monkeypatch.context() as patched:
        signal_at_step(patched, 1, signal.SIGTERM)
        code, err = mtl_run(args, tmp_path, patched, capsys)
    assert code == 143 and len(err.strip().splitlines()) == 1 and "SIGTERM at epoch 1, step 2" in err, err

    # SLURM starts a pre-empted job again with the same command line: it continues by itself
    # (here from step 2), and a double Ctrl-C then stops it at once, the checkpoint intact
    with monkeypatch.context() as patched:
        patched.setenv("SLURM_RESTART_COUNT", "1")
        signal_at_step(patched, 3, signal.SIGINT, signal.SIGINT)
        code, err = mtl_run(args, tmp_path, patched, capsys)
    checkpoint = tmp_path / "job" / "checkpoints" / "last.pt"
    assert code == 130 and err.strip().startswith(f"mtl-run: stopped at once by Ctrl-C (a second one, or outside the training steps); the checkpoint {checkpoint} is intact")
    assert json.loads((tmp_path / "job" / "results.json").read_text())["status"] == "interrupted"
    assert torch.load(checkpoint, weights_only=False)["state"]["step"] == 2  # the resumed run started there
    assert signal.getsignal(signal.SIGINT) is handler_before  # handlers restored


@pytest.mark.parametrize("value", ["runs/my run ü", 'a"b', "a\\b", "end\\", "x,y=[z]", "plain/path-1.0"])
def test_override_reads_back_exactly(value: str) -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    assert OverridesParser.create().parse_override(override("resume", value)).value() == value


def test_resume_of_a_directory_with_a_space_points_hydra_there(tmp_path: Path) -> None:
    run_dir = tmp_path / "my run ü"
    io.torch_save(run_dir / "checkpoints" / "last.pt", {})
    extra = preflight([*TINY, override("resume", str(run_dir))])
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(extra)
    assert [(o.key_or_group, o.value()) for o in parsed] == [("hydra.run.dir", str(run_dir.resolve()))]


# ------------------------------------------------------- 3: non-finite weights
@pytest.mark.parametrize("fused", [False, True], ids=["host-guard", "device-guard"])
def test_an_update_to_non_finite_weights_stops_the_run(tmp_path: Path, fused: bool) -> None:
    # the config validation would refuse lr=inf; the guard must hold without it
    cfg = compose_config([*TINY, "optimizer.lr=inf", f"optimizer.fused={str(fused).lower()}", "trainer.checkpoint_every_n_steps=1"])
    with pytest.raises(NonFiniteError, match="weights are non-finite"):
        run_experiment(cfg, tmp_path)
    assert json.loads((tmp_path / "results.json").read_text())["status"] == "failed"
    checkpoint = tmp_path / "checkpoints" / "last.pt"
    if checkpoint.exists():  # written before the bad update, never after it
        weights = torch.load(checkpoint, weights_only=False)["model"].values()
        assert all(torch.isfinite(w).all() for w in weights if w.is_floating_point())


@pytest.mark.parametrize("lr", ["inf", "-inf", "nan", "0", "-1"])
def test_lr_must_be_finite_and_positive(lr: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = preflight_exit([f"optimizer.lr={lr}"], capsys)
    assert code == 2 and "optimizer.lr" in err and "finite float > 0" in err


# ------------------------------------------------------------ 4: "+" additions
@pytest.mark.parametrize("added, key", [("+trainer.epoch=5", "trainer.epoch"), ("+foo=bar", "foo"),
                                        ("+diagnostics.every=3", "diagnostics.every"), ("+balancer.foo=1", "balancer.foo")])
def test_keys_added_with_plus_are_validated(added: str, key: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = preflight_exit([added], capsys)
    assert code == 2 and f"unknown key {key}" in err and "allowed:" in err


def test_optional_groups_may_still_be_added(capsys: pytest.CaptureFixture[str]) -> None:
    assert preflight_exit([*TINY, "+aux=rotation"], capsys) == (0, "")


# ------------------------------------------------- 5: arguments and data files
@pytest.mark.parametrize("args, expected", [
    (["optimizer.betas=[0.9]"], "optimizer.betas=[0.9] is not a list of 2"),
    (["optimizer.betas=[2,0.9]"], "optimizer=AdamW: Invalid beta parameter"),
    (["optimizer=sgd", "optimizer.momentum=-1"], "optimizer=SGD: Invalid momentum value"),
])
def test_optimizer_arguments_fail_in_one_line(args: list[str], expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = preflight_exit(args, capsys)
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _bad_magic(path: Path) -> None:
    path.write_bytes(gzip.compress(b"\x08\x03\x00\x00" + bytes(64)))


def _not_gzip(path: Path) -> None:
    path.write_bytes(b"this is not gzip data at all")


@pytest.mark.parametrize("damage, reason", [(_truncate, "truncated"), (_bad_magic, "bad magic"), (_not_gzip, "not a gzipped file")])
def test_damaged_mnist_files_name_the_file(tmp_path: Path, damage: Callable[[Path], None], reason: str) -> None:
    write_mnist(tmp_path)
    images = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte.gz"
    damage(images)
    with pytest.raises(DatasetRootError, match=reason) as caught:
        read_idx(images)
    assert str(images) in str(caught.value) and "re-download MNIST" in str(caught.value)


def test_unreadable_dataset_files_and_roots_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    # tests may run as root, which permissions do not stop: the refusals are simulated
    write_mnist(tmp_path)
    images = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte.gz"
    with monkeypatch.context() as patched:
        patched.setattr(gzip, "open", lambda *a, **k: (_ for _ in ()).throw(PermissionError(13, "Permission denied", str(images))))
        with pytest.raises(DatasetRootError, match="permission denied"):
            read_idx(images)
        code, err = preflight_exit(["dataset=multimnist", "backbone=lenet", f"dataset.root={tmp_path}"], capsys)
        assert code == 2 and str(images) in err and "permission denied" in err
    real_access = os.access
    with monkeypatch.context() as patched:
        patched.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path / "nyu" else real_access(p, mode))
        (tmp_path / "nyu").mkdir()
        code, err = preflight_exit(["dataset=nyuv2", f"dataset.root={tmp_path / 'nyu'}"], capsys)
        assert code == 2 and "cannot be read (permission denied)" in err


def test_a_file_as_dataset_root_is_called_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "nyu.zip").write_bytes(b"PK")
    code, err = preflight_exit(["dataset=nyuv2", f"dataset.root={tmp_path / 'nyu.zip'}"], capsys)
    assert code == 2 and "is a file, not a directory" in err


# ---------------------------------------------------------- 6: unwritable outputs
def test_an_output_directory_that_cannot_be_created_fails_before_hydra(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("")
    code, err = preflight_exit([*TINY, f"hydra.run.dir={tmp_path / 'file' / 'run'}"], capsys)
    assert code == 2 and "is a file, not a directory" in err
    code, err = preflight_exit(["-m", *TINY, "hydra.sweep.dir=/proc/mtl-run-sweep"], capsys)
    assert code == 2 and err.startswith("mtl-run: error: hydra.sweep.dir=/proc/mtl-run-sweep: cannot create directories in /proc")


def test_resuming_a_read_only_run_directory_fails_before_hydra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    io.torch_save(run_dir / "checkpoints" / "last.pt", {})
    make_dir = tempfile.mkdtemp

    def read_only(prefix: str | None = None, dir: str | Path | None = None) -> str:  # noqa: A002 - mkdtemp's name
        if dir is not None and Path(dir) == run_dir:
            raise PermissionError(13, "Permission denied")
        return make_dir(prefix=prefix, dir=dir)

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)  # tests may run as root: the refusal is simulated
    code, err = preflight_exit([f"resume={run_dir}"], capsys)
    assert code == 2 and f"resume={run_dir}: cannot create directories in {run_dir} (permission denied)" in err


def test_a_failure_to_record_a_failure_does_not_hide_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    write_text = io.write_text

    def read_only_at_the_end(path: Path, text: str) -> None:  # the directory turned read-only mid-run
        if Path(path).name in ("error.txt", "results.json"):
            raise PermissionError(13, "Permission denied", str(path))
        write_text(path, text)

    monkeypatch.setattr(io, "write_text", read_only_at_the_end)
    code, err = mtl_run([*TINY, "optimizer.lr=inf", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, monkeypatch, capsys)
    assert code == 2  # the preflight: nothing was run
    monkeypatch.setattr(cli, "validate", lambda cfg: None)  # so that the run itself meets the bad lr
    monkeypatch.setattr("mtl_runner.preflight.validate", lambda cfg: None)
    code, err = mtl_run([*TINY, "optimizer.lr=inf", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, monkeypatch, capsys)
    assert code == 1
    assert "NonFiniteError: step 1: the weights are non-finite" in err and "could not be written" in err
    assert "traceback in" not in err  # no pointer to an error.txt that does not exist


# ------------------------------------------------------------- 7: mtl-report
@pytest.mark.parametrize("content", ["[1, 2, 3]", '"text"', "null", '{"tasks": [1]}', '{"tasks": {"a": 3}}',
                                     '{"status": 1, "delta_m_pct": "x", "error": [1]}', "{not json"])
def test_mtl_report_survives_any_results_file(tmp_path: Path, content: str) -> None:
    (tmp_path / "results.json").write_text(content)
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text(": : [")
    row = load_job(tmp_path, "job")
    assert isinstance(row.status, str) and (row.delta_m is None or isinstance(row.delta_m, float))


# ------------------------------------------------------------ 8: the smaller ones
def test_the_smaller_messages(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = preflight_exit(["hydra.run.dir=runs/my run ü"], capsys)
    assert code == 2 and "must be quoted" in err
    code, err = preflight_exit(["balancer=dwa", "balancer.foo=1"], capsys)
    assert code == 2 and "unknown key balancer.foo; allowed: temp" in err
    code, err = preflight_exit(["hydra/launcher=nope"], capsys)
    assert code == 2 and "joblib" in err and "submitit_slurm" in err


def test_a_one_value_sweep_names_its_job_by_its_overrides(capsys: pytest.CaptureFixture[str]) -> None:
    extra = preflight(["-m", *TINY, "trainer.seed=3"])
    assert extra == ["hydra.job.config.override_dirname.exclude_keys=[trainer.progress,trainer.device]"]


def test_sweep_job_names_stay_unique() -> None:
    """Job directories are named by the swept overrides; where those cannot tell two jobs
    apart, the job number leads again, so no job writes into another's directory."""
    numbered = "hydra.sweep.subdir=${hydra.job.num}_${hydra.job.override_dirname}"
    swept_device = preflight(["-m", *TINY, "trainer.device=cpu,auto"])
    assert "trainer.device" not in swept_device[0] and numbered not in swept_device
    assert numbered in preflight(["-m", *TINY, "optimizer.lr=0.001,0.001"])
    assert numbered not in preflight(["-m", *TINY, "optimizer.lr=0.001,0.002"])
