"""One run, end to end: build from the config, train, test, compare, write results."""

from __future__ import annotations

import time
import traceback
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from mtl_runner import baselines, build, checkpoints, io, results
from mtl_runner.assemble import build_run, prepare_process
from mtl_runner.data import summary as data_summary
from mtl_runner.data.base import TaskSet
from mtl_runner.errors import ConfigError
from mtl_runner.train import distributed, interrupt
from mtl_runner.train.callbacks import Checkpointing
from mtl_runner.train.reference import evaluate_trivial, fit_trivial


#: Config sections that must match between a run and its resumption (epochs may grow).
RESUME_MUST_MATCH = ("dataset", "backbone", "sharing", "balancer", "surgery", "optimizer", "trainer.seed",
                     "trainer.batch_size", "trainer.max_batches_per_epoch", "trainer.lr_schedule", "trainer.warmup_epochs",
                     "trainer.lr_step_epochs", "trainer.lr_step_gamma", "finetune")


def load_resume_checkpoint(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """The checkpoint to resume from, checked against the new config (one-line errors)."""
    checkpoint = checkpoints.load(checkpoints.last_checkpoint(run_dir), f"resume={cfg.resume}", weights_only=False)
    saved = OmegaConf.create(checkpoint.get("config", {}))
    for key in RESUME_MUST_MATCH:
        if _plain(OmegaConf.select(saved, key, default=None)) != _plain(OmegaConf.select(cfg, key, default=None)):
            raise ConfigError(f"resume={cfg.resume}: {key} differs from the run being resumed; only trainer.epochs and logging settings may change")
    return checkpoint


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


HPARAM_GROUPS = ("dataset", "backbone", "sharing", "balancer", "surgery", "optimizer")


def option_names(cfg: DictConfig, choices: dict[str, str] | None) -> dict[str, str]:
    """The option chosen in each group (Hydra's choices; else the ``_target_``'s name)."""
    names = {}
    for group in HPARAM_GROUPS:
        if choices and choices.get(group):
            names[group] = str(choices[group])
        else:
            names[group] = str(cfg[group]["_target_"]).rsplit(".", 1)[-1].lower()
    return names


def hparam_values(cfg: DictConfig, choices: dict[str, str] | None,
                  swept: dict[str, list[str]] | None) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """This run's HPARAMS-tab values and the domains of the swept ones, by hparam name.

    Hparams are named by their override keys (``balancer``, ``optimizer.lr``), the names of
    ``mtl-report``'s columns, so the two tables read alike. ``swept``: the override keys a
    sweep varies and the values it tries (as typed on the command line); a swept key
    outside the fixed set joins it, and each domain takes the type of this run's value."""
    values: dict[str, Any] = {**option_names(cfg, choices), "optimizer.lr": float(cfg.optimizer.lr),
                              "trainer.seed": float(cfg.trainer.seed)}
    domains: dict[str, list[Any]] = {}
    for name, options in (swept or {}).items():
        if name not in values:
            value = OmegaConf.select(cfg, name, default=None)
            values[name] = value if isinstance(value, (bool, str)) else float(value) if isinstance(value, (int, float)) else str(value)
        kind = type(values[name])
        try:
            domains[name] = [o.lower() == "true" if kind is bool else kind(o) for o in options]
        except ValueError:  # e.g. a swept value typed as an expression: flagged, without a domain
            domains[name] = []
    return values, domains


def run_experiment(
    cfg: DictConfig, run_dir: Path, run_name: str | None = None, choices: dict[str, str] | None = None,
    swept: dict[str, list[str]] | None = None, taskset: TaskSet | None = None, quiet: bool = False,
) -> dict[str, Any]:
    """Train, test and write results. ``taskset``: the config's data, built once by a caller
    that runs several configs on it (``mtl-advise``, which also asks for ``quiet``: nothing
    printed, the files written as always). SIGINT/SIGTERM during training stop the run at the
    next step boundary with a checkpoint (:class:`~mtl_runner.train.interrupt.RunInterrupted`). On
    failure or interrupt the run dir records the status (``results.json`` status
    ``failed``/``interrupted``, the traceback of a failure in ``error.txt``) and the
    exception propagates; a failure to write those records is added to the exception's
    notes, never raised in its place."""
    run_dir = Path(run_dir)
    name = run_name or run_dir.name
    try:
        return _run(cfg, run_dir, name, choices, swept, taskset, quiet)
    except ConfigError:
        raise
    except BaseException as exc:
        _record_failure(cfg, run_dir, name, exc)
        raise


def _record_failure(cfg: DictConfig, run_dir: Path, name: str, exc: BaseException) -> None:
    """``results.json`` (and ``error.txt`` for a failure) of a run that did not complete."""
    stopped = isinstance(exc, (interrupt.RunInterrupted, KeyboardInterrupt))
    record = {
        "run_name": name, "status": "interrupted" if stopped else "failed",
        "error": f"{type(exc).__name__}: {exc}", "config": OmegaConf.to_container(cfg, resolve=True),
    }
    try:
        if not stopped:
            io.write_text(run_dir / "error.txt", traceback.format_exc())
        io.write_json(run_dir / "results.json", record)
    except OSError as write_error:
        exc.add_note(f"(its record could not be written to {run_dir}: {type(write_error).__name__}: {write_error.strerror or write_error})")


def _run(cfg: DictConfig, run_dir: Path, run_name: str, choices: dict[str, str] | None,
         swept: dict[str, list[str]] | None, taskset: TaskSet | None, quiet: bool) -> dict[str, Any]:
    started = time.perf_counter()
    # Under trainer.strategy=ddp every rank trains; rank 0 alone writes and prints.
    group = distributed.init_process_group(cfg.trainer.device) if cfg.trainer.strategy == "ddp" else None
    main = group is None or group.is_main
    console = Console(quiet=quiet or not main)
    prepare_process(cfg)
    checkpoint = load_resume_checkpoint(cfg, run_dir) if cfg.resume else None
    run = build_run(cfg, run_dir, name=run_name, group=group, console=console, taskset=taskset,
                    resume_step=checkpoint["state"]["step"] if checkpoint else None)
    trainer, taskset, device = run.trainer, run.taskset, run.device
    saver = next((cb.save for cb in trainer.callbacks if isinstance(cb, Checkpointing)), None)
    requests = interrupt.StopRequests()
    trainer.callbacks.append(interrupt.StopAtSafePoint(requests, saver))
    try:
        data_summary.report(taskset, console, run_dir if main else None)
        if checkpoint is not None:
            trainer.load_checkpoint(checkpoint)
            console.print(f"resuming {run_dir} at epoch {trainer.state.epoch + 1}, step {trainer.state.step}")
        # Baselines first: best_val selection scores by validation Δm against them (every
        # ddp rank reads them, so all ranks select the same epoch).
        baselines_started = time.perf_counter()
        records = baselines.ensure_all(cfg, taskset, console) if cfg.baseline.enabled and (main or run.selection) else None
        baselines_seconds = time.perf_counter() - baselines_started  # not the MTL run's time (results.md compares the two)
        if run.selection is not None and records:
            run.selection.score = baselines.validation_delta_m_score(taskset.tasks, records)
        with requests.active():  # Ctrl-C elsewhere (baselines, evaluation) stops at once
            trainer.fit()
        if requests.signum:  # came after the last step: its epoch-end checkpoint is written
            raise interrupt.RunInterrupted(requests.signum, trainer.state.epoch, trainer.state.step, saver is not None)
        val = trainer.evaluate(trainer.taskset.val)
        test = trainer.test()
        trivial = evaluate_trivial(taskset.tasks, fit_trivial(taskset.tasks, taskset.train, device), taskset.test, device)
        out: dict[str, Any] = {
            "run_name": run_name,
            "status": "completed",
            "nonfinite_steps": trainer.state.nonfinite_steps,
            "fp16_overflow_steps": trainer.state.overflow_steps,
            "tasks": results.task_results(taskset.tasks, test.metrics, trivial),
            "test_losses": test.losses,
            "parameters": {"mtl": build.count_parameters(run.model), **run.model.parameter_counts()},
            "forward_passes_per_input": run.model.forward_passes_per_input,
            "device": str(device),
            "epochs": trainer.state.epoch,
            "steps": trainer.state.step,
            "resumed": checkpoint is not None,
            "jacobian_strategy": trainer.engine.strategy,
            "selection": run.selection.summary() if run.selection else {"rule": "last", "epoch": trainer.state.epoch},
            "val": baselines.split_block(taskset.tasks, val.metrics, val.losses, records and {t: r.val_metrics for t, r in records.items()}),
            "test": baselines.split_block(taskset.tasks, test.metrics, test.losses, records and {t: r.metrics for t, r in records.items()}),
            "wall_time_s": time.perf_counter() - started - baselines_seconds,
            "config": OmegaConf.to_container(cfg, resolve=True),
        }
        if not main:
            return out
        if records is not None:
            baselines.add_to_results(out, records)
        results.write(run_dir, out)
        results.print_summary(out, console)
        values, domains = hparam_values(cfg, choices, swept)
        run.logger.hparams(values, results.final_metrics(out), trainer.state.step, domains)
        return out
    finally:
        run.logger.close()
