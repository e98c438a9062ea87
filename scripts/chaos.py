"""Fault injection: SIGKILL, SIGTERM and SIGINT a training run at random points, resume it
each time, and check that it ends exactly where an uninterrupted run of the same seed ends.

A user's run dies for reasons it does not choose (a pre-empted node, an OOM kill, a
closed laptop). ``mtl-run resume=<run dir>`` promises that this costs nothing but time:
the resumed run's final metrics equal the uninterrupted run's, bit for bit, and its
TensorBoard curves have each step exactly once (no duplicated or missing points where
the kills happened). This script tests that promise end to end, as a user would meet it:
real ``mtl-run`` processes; SIGKILL (no handler runs, no flush), which lands anywhere
(mid-step, mid-checkpoint-write, during validation); SIGTERM (a scheduler's pre-emption)
and SIGINT (Ctrl-C), which must stop the run at the next step boundary with a checkpoint
and exit 143 / 130; and a fresh resume after each. The signals take turns.

Kill points are random but reproducible from ``--seed``: for each kill a target step is
drawn ahead of the checkpoint on disk, the script waits until the checkpoint has reached
it, then sleeps a random part of one step's duration so that the kill does not always
land right after a write. The TensorBoard check reads the events as TensorBoard does: the
points a killed process wrote after its last checkpoint are purged when the resumed run
writes those steps again (the reader logs that it purged them; the script silences it).

    python scripts/chaos.py                    # 6 interruptions on a small built-in-dataset run
    python scripts/chaos.py --kills 10 --seed 3 --signals KILL,TERM -- surgery=pcgrad balancer=uncertainty

Prints one row per kill and a verdict; exits 1 when a check fails. Takes about a
minute on a 2-core CPU at the defaults.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

#: A small run that checkpoints and logs every step, so every step boundary is a
#: possible resume point and every step's scalars are checked.
BASE = [
    "dataset.num_train=256", "dataset.num_val=32", "dataset.num_test=32", "dataset.image_size=32",
    "backbone.channels=[8,8,16,16]", "trainer.epochs=3", "trainer.batch_size=16", "trainer.progress=off",
    "trainer.checkpoint_every_n_steps=1", "trainer.log_every_n_steps=1", "diagnostics.every_n_steps=5",
    "baseline=off",
]
#: Tags whose step sequences must match the uninterrupted run's.
TAGS = ("loss/train/total", "lr", "metric/val/seg/miou")
WAIT_S = 300
#: The exit code each signal must end mtl-run with (SIGKILL: killed by the kernel).
EXPECTED_EXIT = {"KILL": -signal.SIGKILL, "TERM": 143, "INT": 130}


def mtl_run(args: list[str], cwd: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "mtl_runner", *args], cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def finish(process: subprocess.Popen[bytes], what: str) -> None:
    _, stderr = process.communicate(timeout=WAIT_S)
    if process.returncode != 0:
        last_line = (stderr.decode().strip().splitlines() or ["(no output)"])[-1]
        raise SystemExit(f"{what} failed (exit {process.returncode}): {last_line}")


def checkpoint_step(run_dir: Path) -> int:
    """The step of the checkpoint on disk, or -1 (none yet, or caught mid-replace)."""
    try:
        return int(torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)["state"]["step"])
    except Exception:
        return -1


def _status(run_dir: Path) -> str | None:
    """``results.json``'s status (an interrupted run writes one too), or None."""
    try:
        return json.loads((run_dir / "results.json").read_text()).get("status")
    except (OSError, ValueError):
        return None


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """``tag -> [(step, wall time)]`` as TensorBoard shows them (purged points removed)."""
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(event.step, event.wall_time) for event in accumulator.Scalars(tag)] for tag in TAGS}


def scalar_steps(run_dir: Path) -> dict[str, list[int]]:
    return {tag: [step for step, _ in points] for tag, points in scalars(run_dir).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=6, help="how many times to interrupt and resume (default 6)")
    parser.add_argument("--signals", default="KILL,TERM,INT", help="signals to send, in turn (default KILL,TERM,INT)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill points (not of training)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("overrides", nargs="*", help="extra mtl-run overrides, after --")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    logging.getLogger("tensorboard").setLevel(logging.ERROR)  # "Purging expired events" on resumed runs
    config = [*BASE, *args.overrides]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mtl-chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)
    reference, chaos = workdir / "reference", workdir / "chaos"
    for run_dir in (reference, chaos):
        shutil.rmtree(run_dir, ignore_errors=True)
    console = Console()

    finish(mtl_run([*config, f"hydra.run.dir={reference}"], workdir), "the uninterrupted run")
    logged = scalars(reference)["lr"]
    total_steps = logged[-1][0] + 1
    step_s = (logged[-1][1] - logged[0][1]) / max(1, len(logged) - 1)

    signals = [name.strip().upper().removeprefix("SIG") for name in args.signals.split(",")]
    if not signals or any(name not in EXPECTED_EXIT for name in signals):
        parser.error(f"--signals {args.signals}: choose among {', '.join(EXPECTED_EXIT)}")
    table = Table(title=f"{args.kills} interruptions ({', '.join(signals)}) of a {total_steps}-step run (seed {args.seed})")
    for column in ("#", "signal", "target step", "extra delay s", "checkpoint step after", "exit code", "completed"):
        table.add_column(column, justify="right")
    wrong_exits = []
    process = mtl_run([*config, f"hydra.run.dir={chaos}"], workdir)
    for number in range(1, args.kills + 1):
        # spread the kills over the steps still to run: about one per equal share of them
        done = max(0, checkpoint_step(chaos))
        share = max(1, (total_steps - done) // (args.kills - number + 2))
        target = min(total_steps - 1, done + rng.randint(1, 2 * share))
        deadline = time.monotonic() + WAIT_S
        while process.poll() is None and checkpoint_step(chaos) < target and time.monotonic() < deadline:
            time.sleep(0.01)
        delay = rng.uniform(0.0, step_s)
        time.sleep(delay)
        name = signals[(number - 1) % len(signals)]
        process.send_signal(getattr(signal, f"SIG{name}"))
        code = process.wait(timeout=WAIT_S)
        finished = _status(chaos) == "completed"
        if not finished and code != EXPECTED_EXIT[name]:
            wrong_exits.append(f"#{number} SIG{name}: exit {code}")
        table.add_row(str(number), name, str(target), f"{delay:.2f}", str(checkpoint_step(chaos)), str(code),
                      "yes" if finished else "no")
        if finished:
            break
        process = mtl_run([*config, f"resume={chaos}"], workdir)
    else:
        finish(process, "the last resumed run")
    console.print(table)

    want = json.loads((reference / "results.json").read_text())
    got = json.loads((chaos / "results.json").read_text())
    checks = {
        "each signal's exit code (KILL -9, TERM 143, INT 130)": not wrong_exits,
        "run completed": got.get("status") == "completed",
        "final metrics identical": got["tasks"] == want["tasks"],
        "TensorBoard steps identical": scalar_steps(chaos) == scalar_steps(reference),
    }
    for check, ok in checks.items():
        console.print(f"{'[green]ok  ' if ok else '[red]FAIL'}[/] {check}")
    for wrong in wrong_exits:
        console.print(f"[red]  {wrong}")
    console.print(f"runs kept in {workdir}" if args.workdir else f"runs in {workdir} (temporary)")
    raise SystemExit(0 if all(checks.values()) else 1)


if __name__ == "__main__":
    main()
