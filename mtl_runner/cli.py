"""Entry points: ``mtl-run`` (Hydra) and ``mtl-report``.

``mtl-run`` first composes and validates the configuration of every job it is about to
launch (all jobs of a ``-m`` grid, see :mod:`mtl_runner.preflight`), so that bad input
fails in a second with one line naming the key and what is allowed, before Hydra creates
any output directory. Then it hands over to Hydra, which owns ``--help``, ``--cfg``,
multirun and launchers.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from mtl_runner import io
from mtl_runner.config import CONF_DIR, validate
from mtl_runner.errors import ConfigError, DatasetRootError
from mtl_runner.checkpoints import last_checkpoint
from mtl_runner.preflight import fail, override, preflight
from mtl_runner.train import distributed
from mtl_runner.train.interrupt import EXIT_CODES, RunInterrupted


# conf/hydra/default.yaml names a sweep's job directories by their overrides alone, which is
# what TensorBoard shows as run names; a job without overrides gets job<n>.
OmegaConf.register_new_resolver("mtl_job_dir", lambda overrides, num: overrides or f"job{num}", replace=True)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    """One job. Returns the run's ``objective`` to a sweeper (Optuna), ``None`` when the
    job failed: the sweeper records a failed trial and the study goes on."""
    from mtl_runner.runner import run_experiment
    from mtl_runner.sweep import apply_job_resources, objective_value

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    sweeping = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        validate(cfg)
        choices = {k: v for k, v in hydra_cfg.runtime.choices.items() if v is not None}
        apply_job_resources(cfg, hydra_cfg.launcher, hydra_cfg.job.num if sweeping else 0)
        if _requeued() and not cfg.resume and last_checkpoint(run_dir).is_file():
            cfg.resume = str(run_dir)  # a pre-empted job that SLURM started again continues
        out = run_experiment(cfg, run_dir, run_name=_run_name(hydra_cfg), choices=choices, swept=_swept(hydra_cfg))
    except (RunInterrupted, KeyboardInterrupt) as exc:
        print(f"mtl-run: {_stopped(exc, run_dir, list(hydra_cfg.overrides.task))}", file=sys.stderr)
        raise SystemExit(exc.exit_code if isinstance(exc, RunInterrupted) else EXIT_CODES[signal.SIGINT]) from None
    except (ConfigError, DatasetRootError) as exc:  # found once the data is read: still one line
        if not sweeping:
            fail(str(exc))
        io.write_json(run_dir / "results.json", {"run_name": _run_name(hydra_cfg), "status": "failed", "error": str(exc)})
        print(f"mtl-run: job {run_dir.name} failed: {exc}", file=sys.stderr)
        return None
    except Exception as exc:
        # run_experiment recorded status and traceback in the run dir. A failing sweep
        # job must not stop its siblings: SweepStatus reports failures at the end.
        message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if (run_dir / "error.txt").is_file():
            message += f" (traceback in {run_dir / 'error.txt'})"
        message += "".join(f" {note}" for note in getattr(exc, "__notes__", ()))
        if not sweeping:
            print(f"mtl-run: error: run failed: {message}", file=sys.stderr)
            raise SystemExit(1) from None
        print(f"mtl-run: job {run_dir.name} failed: {message}", file=sys.stderr)
        return None
    if not sweeping:
        return None
    try:
        return objective_value(out, cfg.objective)
    except ConfigError as exc:  # the run itself completed: its results.json stays
        print(f"mtl-run: job {run_dir.name}: {exc}", file=sys.stderr)
        return None


class SweepStatus(Callback):
    """Hydra callback: after a sweep, list the jobs that did not complete (whatever the
    launcher, by reading each job's results.json) and make mtl-run exit non-zero."""

    failed: list[str] = []

    def on_multirun_end(self, config: DictConfig, **kwargs: object) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        failed = []
        for job_dir in sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            results_file = job_dir / "results.json"
            try:
                status = json.loads(results_file.read_text()).get("status")
            except (OSError, ValueError):
                status = "unfinished"
            if status != "completed":
                failed.append(f"{job_dir.name} ({status})")
        SweepStatus.failed = failed
        if failed:
            print(f"mtl-run: {len(failed)} job(s) of the sweep did not complete: {'; '.join(failed)}", file=sys.stderr)


def _requeued() -> bool:
    """Whether SLURM started this job again after a pre-emption or a requeue (the
    submitit launcher requeues a job that reaches its time limit): it then continues from
    the checkpoint in its own directory."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0


def _stopped(exc: BaseException, run_dir: Path, task_overrides: list[str]) -> str:
    """The one line of a stopped run: where, whether its checkpoint is saved, and the
    command that resumes it (the run's own overrides, quoted for a POSIX shell)."""
    checkpoint = last_checkpoint(run_dir)
    if isinstance(exc, RunInterrupted):
        where = f"stopped by {exc}"
        saved = f"checkpoint saved to {checkpoint}" if exc.checkpointed else "this run keeps no checkpoint"
    else:
        where = "stopped at once by Ctrl-C (a second one, or outside the training steps)"
        saved = f"the checkpoint {checkpoint} is intact" if checkpoint.is_file() else "no checkpoint had been written yet"
    if not checkpoint.is_file():
        return f"{where}; {saved}"
    kept = [o for o in task_overrides if not o.startswith("resume=")]
    command = shlex.join(["mtl-run", *kept, override("resume", str(run_dir))])
    return f"{where}; {saved}; resume with: {command}"


def _run_name(hydra_cfg: DictConfig) -> str:
    overrides = hydra_cfg.job.override_dirname
    return overrides or Path(hydra_cfg.runtime.output_dir).name


def _swept(hydra_cfg: DictConfig) -> dict[str, list[str]]:
    """The keys this job's sweep varies, with the values it tries: the sweep's own
    overrides and ``hydra.sweeper.params``, as saved in ``multirun.yaml`` (Hydra writes it
    before launching the jobs); empty for a single run. The keys left out of job names
    (``trainer.device``...) are left out here too."""
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return {}
    try:
        saved = OmegaConf.load(Path(hydra_cfg.sweep.dir) / "multirun.yaml").hydra
        given = [*saved.overrides.task, *(f"{k}={v}" for k, v in (saved.sweeper.get("params") or {}).items())]
        parsed = OverridesParser.create().parse_overrides(given)
    except Exception:  # an unreadable or foreign multirun.yaml: the HPARAMS tab still lists every value
        return {}
    excluded = set(hydra_cfg.job.config.override_dirname.exclude_keys)
    swept: dict[str, list[str]] = {}
    for item in parsed:
        if item.is_sweep_override() and item.key_or_group not in excluded:
            swept[item.key_or_group] = list(item.sweep_string_iterator()) if item.is_discrete_sweep() else []
    return swept


def run() -> None:
    """``mtl-run``: validate, then let Hydra compose, launch and record the run(s)."""
    try:
        sys.argv += preflight(sys.argv[1:])
        _hydra_main()
        distributed.close_process_group()  # under torchrun; a failed rank ends its job without it
    except KeyboardInterrupt:  # outside a run (composing, checking files): nothing to save
        print("mtl-run: interrupted before training started; nothing was saved", file=sys.stderr)
        raise SystemExit(EXIT_CODES[signal.SIGINT]) from None
    if SweepStatus.failed:
        raise SystemExit(1)


def report() -> None:
    """``mtl-report``: compare runs and sweeps (see :mod:`mtl_runner.report`)."""
    from mtl_runner.report import main

    main()


if __name__ == "__main__":
    run()
