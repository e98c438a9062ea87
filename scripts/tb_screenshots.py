"""Screenshots of TensorBoard's HPARAMS and CUSTOM SCALARS tabs for a 2 x 2 sweep, by headless Chromium.

The docs show what a user sees when comparing the jobs of a sweep; these pictures are
taken, not drawn, so that they change when the logging changes. The script runs a small
``mtl-run -m balancer=uniform,uncertainty surgery=none,pcgrad`` (baselines on, so Δm
exists) into ``--runs`` (or takes an existing sweep with ``--logdir``), starts
``tensorboard`` on a free local port, waits until it serves every job's run and the
hparams experiment, and has Chromium screenshot each tab into ``--out``:

    python scripts/tb_screenshots.py [--logdir SWEEP] [--runs outputs/tb_screenshots]
        [--out docs] [--chromium PATH] [override ...]

Trailing arguments are extra ``mtl-run`` overrides for the sweep. Chromium comes from the
system (Debian: ``apt-get install chromium``); it is no dependency of the project. On a
2-core CPU the whole script took 142 s with nothing else running (most of it training the
single-task baselines; 23 s once they are cached in ``outputs/baselines``) and 31 minutes
when other jobs kept the load at 10-14.

TensorBoard is a single-page app that fetches its data after the page loads: the tab is
chosen by the URL's hash, and ``--virtual-time-budget`` lets the page run its timers and
requests before Chromium captures it (a plain ``--screenshot`` would catch the empty
frame).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

SWEEP = ("balancer=uniform,uncertainty", "surgery=none,pcgrad")
# Small enough to run in minutes on a loaded 2-core CPU; enough steps for curves.
SIZES = ("dataset.image_size=32", "dataset.num_train=400", "dataset.num_val=200",
         "dataset.num_test=200", "trainer.epochs=3", "trainer.progress=off", "baseline=on")
# tab (the URL hash) -> file name and window size: the HPARAMS table of four rows needs
# less height than the CUSTOM SCALARS page, whose first categories should be in view.
TABS = {
    "hparams": ("tb_hparams.png", (1760, 400)),
    "custom_scalars": ("tb_custom_scalars.png", (1600, 1000)),
}
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
STARTUP_TIMEOUT_S = 120
RENDER_BUDGET_MS = 20_000  # virtual time: the page's fetches and charts, not wall time
SCREENSHOT_TIMEOUT_S = 120


def find_chromium(explicit: str | None) -> str:
    found = shutil.which(explicit) if explicit else next(filter(None, map(shutil.which, CHROMIUM_NAMES)), None)
    if found is None:
        sys.exit(f"--chromium: no {explicit or ' / '.join(CHROMIUM_NAMES)} on PATH; "
                 "install one (Debian: apt-get install chromium) or pass its path")
    return found


def run_sweep(runs: Path, overrides: Sequence[str]) -> Path:
    """The 2 x 2 sweep, through ``python -m mtl_runner`` (what ``mtl-run`` runs), into a
    fresh ``runs`` so that TensorBoard shows exactly these four jobs."""
    shutil.rmtree(runs, ignore_errors=True)
    command = [sys.executable, "-m", "mtl_runner", "-m", *SIZES, *SWEEP, *overrides, f"hydra.sweep.dir={runs.resolve()}"]
    print("running:", " ".join(command[2:]), flush=True)
    subprocess.run(command, check=True)
    return runs


def job_runs(sweep: Path) -> list[str]:
    """The TensorBoard run names the sweep should show: its directories holding events."""
    return sorted(str(p.parent.relative_to(sweep)) for p in sweep.rglob("events.out.tfevents.*"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, body: dict | None = None) -> object:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@contextlib.contextmanager
def tensorboard(logdir: Path, expected_runs: Sequence[str]) -> Iterator[str]:
    """A TensorBoard server on a free local port, yielded once it serves every expected
    run and the hparams plugin's experiment (the last thing it loads); stopped on exit."""
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1",
         "--port", str(port), "--load_fast=false", "--reload_interval=2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            with contextlib.suppress(OSError, ValueError):
                runs = get_json(f"{base}/data/runs")
                experiment = get_json(f"{base}/data/plugin/hparams/experiment", {"experimentName": ""})
                if set(expected_runs) <= set(runs) and experiment.get("hparamInfos"):  # type: ignore[union-attr, arg-type]
                    break
            if server.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"tensorboard on {base} did not serve the runs {list(expected_runs)} within {STARTUP_TIMEOUT_S} s")
            time.sleep(1)
        yield base
    finally:
        server.terminate()
        server.wait(timeout=30)


def screenshot(chromium: str, url: str, out: Path, window: tuple[int, int]) -> None:
    command = [chromium, "--headless", "--disable-gpu", "--hide-scrollbars", "--mute-audio",
               f"--window-size={window[0]},{window[1]}", f"--virtual-time-budget={RENDER_BUDGET_MS}",
               f"--screenshot={out.resolve()}", url]
    if os.geteuid() == 0:  # Chromium refuses to run as root inside its sandbox
        command.insert(1, "--no-sandbox")
    out.unlink(missing_ok=True)
    result = subprocess.run(command, capture_output=True, text=True, timeout=SCREENSHOT_TIMEOUT_S)
    if result.returncode != 0 or not out.exists():
        sys.exit(f"chromium could not screenshot {url}: {result.stderr.strip().splitlines()[-1:]}")
    print(f"{out} ({out.stat().st_size // 1024} KB)")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logdir", type=Path, help="an existing sweep to show instead of running the 2 x 2 sweep")
    parser.add_argument("--runs", type=Path, default=Path("outputs/tb_screenshots"), help="where the sweep runs (replaced)")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="directory for the PNGs (default docs)")
    parser.add_argument("--chromium", help=f"the browser (default: the first of {', '.join(CHROMIUM_NAMES)} on PATH)")
    parser.add_argument("overrides", nargs="*", help="extra mtl-run overrides for the sweep")
    args = parser.parse_args(argv)
    chromium = find_chromium(args.chromium)
    if args.logdir is not None and not args.logdir.is_dir():
        parser.error(f"--logdir {args.logdir}: not a directory")
    if not args.out.is_dir():
        parser.error(f"--out {args.out}: not a directory")
    sweep = args.logdir if args.logdir is not None else run_sweep(args.runs, args.overrides)
    expected = job_runs(sweep)
    if not expected:
        sys.exit(f"{sweep}: no TensorBoard event files below it")
    with tensorboard(sweep, expected) as base:
        for tab, (name, window) in TABS.items():
            screenshot(chromium, f"{base}/#{tab}", args.out / name, window)


if __name__ == "__main__":
    main()
