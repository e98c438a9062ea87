"""Training throughput of mtl-run's trainer against a minimal hand-written PyTorch loop.

Both train the same model (built from the same config, same initial weights) on the same
batches of the built-in dataset with AdamW; the hand-written loop is the floor of framework
overhead: zero_grad, forward, summed loss (or hand-rolled PCGrad), backward, step, nothing
else. The trainer runs as ``mtl-run`` does: balancer, engine, non-finite guard, LR
schedule, TensorBoard logging at its default interval, validation at epoch ends (on one
batch of 32 images, so the comparison stays about training). Runs alternate trainer / loop
and the medians over ``--repeats`` are compared, because a shared machine is noisy.

On CUDA it also compares fp32, bf16 and bf16 + torch.compile at batch 256, and reads the
GPU utilisation while the trainer runs (``torch.cuda.utilization``, needs pynvml).

    python scripts/bench_throughput.py                       # CPU (and CUDA when present)
    python scripts/bench_throughput.py --devices cpu --repeats 5
    python scripts/bench_throughput.py --devices cpu --image-size 32   # a quicker CPU pass
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from mtl_runner import build
from mtl_runner.assemble import build_run
from mtl_runner.config import CONF_DIR
from mtl_runner.data.base import TaskSet
from mtl_runner.models.sharing.base import SharingModel
from mtl_runner.train.logger import RunLogger

#: The cnn3 workload of scripts/bench_steps.py on the built-in dataset: a 4-conv encoder
#: (3->32->64->128->128, strides 1,2,2,1) on 3x64x64 images, seg + depth + count heads.
CNN3 = ["backbone=small_cnn", "backbone.channels=[32,64,128,128]", "backbone.strides=[1,2,2,1]", "dataset.image_size=64"]


def compose_run(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides)


def trainer_samples_per_s(cfg: DictConfig, taskset: TaskSet, model: SharingModel, device: torch.device, log_dir: Path,
                          utilisation: list[float] | None = None) -> float:
    # As mtl-run wires it (diagnostics as configured), minus the run directory's files.
    trainer = build_run(cfg, None, name="bench", taskset=taskset, model=model, logger=RunLogger(log_dir),
                        console=Console(quiet=True)).trainer
    sampler = _UtilisationSampler(device) if utilisation is not None else None
    _sync(device)
    start = time.perf_counter()
    trainer.fit()
    _sync(device)
    seconds = time.perf_counter() - start
    if sampler is not None:
        utilisation.extend(sampler.stop())
    trainer.logger.close()
    return cfg.trainer.epochs * len(taskset.train) / seconds


def hand_loop_samples_per_s(cfg: DictConfig, taskset: TaskSet, model: SharingModel, device: torch.device, pcgrad: bool) -> float:
    """The floor: what a person would write for this model without any framework."""
    model = model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optimizer.lr, weight_decay=cfg.optimizer.weight_decay)
    shared = list(model.shared_parameters())
    generator = torch.Generator().manual_seed(cfg.trainer.seed)
    split = taskset.on_device(device).train
    _sync(device)
    start = time.perf_counter()
    for _ in range(cfg.trainer.epochs):
        for x, y in split.batches(cfg.trainer.batch_size, shuffle=True, generator=generator, device=device):
            optimizer.zero_grad(set_to_none=True)
            out = model(x)
            losses = torch.stack([t.loss(out[t.name], y[t.name]) for t in taskset.tasks])
            if pcgrad:
                _hand_pcgrad(losses, shared, generator)
            else:
                losses.sum().backward()
            optimizer.step()
    _sync(device)
    return cfg.trainer.epochs * len(taskset.train) / (time.perf_counter() - start)


def _hand_pcgrad(losses: torch.Tensor, shared: list[torch.nn.Parameter], generator: torch.Generator) -> None:
    """Textbook PCGrad written inline: T backward passes, pairwise projections, summed
    direction into the shared parameters; the heads get their plain gradients."""
    rows = []
    for t in range(len(losses)):
        grads = torch.autograd.grad(losses[t], shared, retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    g = torch.stack(rows)
    projected = g.clone()
    for i in range(len(g)):
        for j in torch.randperm(len(g), generator=generator).tolist():
            if j == i:
                continue
            dot = projected[i] @ g[j]
            projected[i] -= torch.clamp(dot, max=0.0) / g[j].square().sum().clamp_min(1e-20) * g[j]
    direction = projected.sum(0)
    for p in shared:
        p.requires_grad_(False)
    losses.sum().backward()  # heads only
    offset = 0
    for p in shared:
        p.requires_grad_(True)
        p.grad = direction[offset : offset + p.numel()].view_as(p).clone()
        offset += p.numel()


class _UtilisationSampler:
    def __init__(self, device: torch.device) -> None:
        self.samples: list[float] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(device,), daemon=True)
        self._thread.start()

    def _run(self, device: torch.device) -> None:
        while not self._done.wait(0.2):
            try:
                self.samples.append(float(torch.cuda.utilization(device)))
            except Exception:  # pynvml missing: no utilisation column
                return

    def stop(self) -> list[float]:
        self._done.set()
        self._thread.join()
        return self.samples


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compare_with_hand_loop(device: torch.device, args: argparse.Namespace, console: Console) -> None:
    table = Table(title=f"trainer vs hand-written loop on {device} (cnn3 on {args.image_size}x{args.image_size}, batch {args.batch_size}; "
                        f"samples/s, median of {args.repeats})")
    for column in ("surgery", "hand loop", "trainer", "trainer / loop", "trainer + diagnostics", "ratio"):
        table.add_column(column, justify="right")
    methods = ["none"] + (["pcgrad"] if (CONF_DIR / "surgery" / "pcgrad.yaml").exists() else [])
    for surgery in methods:
        common = [*CNN3, f"dataset.image_size={args.image_size}", f"surgery={surgery}", f"trainer.device={device}", f"trainer.epochs={args.epochs}",
                  f"trainer.batch_size={args.batch_size}", f"dataset.num_train={args.num_train}", "dataset.num_val=32",
                  "dataset.num_test=64", "trainer.progress=off", "trainer.jacobian=sequential"]
        plain_cfg = compose_run([*common, "diagnostics=off"])
        diag_cfg = compose_run(common)
        taskset = build.build_taskset(plain_cfg)
        torch.manual_seed(0)
        initial = build.build_model(plain_cfg, taskset)
        hand, trainer, with_diag = [], [], []
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.repeats + 1):  # the first round warms up allocators and kernels
                h = hand_loop_samples_per_s(plain_cfg, taskset, copy.deepcopy(initial), device, pcgrad=surgery == "pcgrad")
                t = trainer_samples_per_s(plain_cfg, taskset, copy.deepcopy(initial), device, Path(tmp) / f"t{surgery}{r}")
                d = trainer_samples_per_s(diag_cfg, taskset, copy.deepcopy(initial), device, Path(tmp) / f"d{surgery}{r}")
                if r:
                    hand.append(h), trainer.append(t), with_diag.append(d)
        ratios = [t / h for t, h in zip(trainer, hand)]
        diag_ratios = [d / h for d, h in zip(with_diag, hand)]
        table.add_row(surgery, f"{statistics.median(hand):.0f}", f"{statistics.median(trainer):.0f}",
                      f"{statistics.median(ratios):.3f}x", f"{statistics.median(with_diag):.0f}", f"{statistics.median(diag_ratios):.3f}x")
    console.print(table)


def compare_precisions(device: torch.device, args: argparse.Namespace, console: Console) -> None:
    table = Table(title=f"precision and compile on {device} (cnn3, batch 256; samples/s, median of {args.repeats})")
    for column in ("setting", "samples/s", "vs fp32", "GPU util %"):
        table.add_column(column, justify="right")
    common = [*CNN3, f"trainer.device={device}", f"trainer.epochs={args.epochs}", "trainer.batch_size=256",
              f"dataset.num_train={max(args.num_train, 4096)}", "dataset.num_val=256", "dataset.num_test=64",
              "trainer.progress=off", "diagnostics=off"]
    settings = {"fp32": [], "bf16": ["trainer.precision=bf16"], "bf16 + compile": ["trainer.precision=bf16", "trainer.compile=true"]}
    base_cfg = compose_run(common)
    taskset = build.build_taskset(base_cfg)
    torch.manual_seed(0)
    initial = build.build_model(base_cfg, taskset)
    medians: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in settings.items():
            cfg = compose_run([*common, *extra])
            runs, util = [], []
            for r in range(args.repeats + 1):
                value = trainer_samples_per_s(cfg, taskset, copy.deepcopy(initial), device, Path(tmp) / f"{name}{r}", util)
                if r:
                    runs.append(value)
            medians[name] = statistics.median(runs)
            util_text = f"{statistics.median(util):.0f}" if util else "n/a"
            table.add_row(name, f"{medians[name]:.0f}", f"{medians[name] / medians['fp32']:.2f}x", util_text)
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--num-train", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=64, help="of the trainer-vs-loop table (32: 4x cheaper steps, for a slow CPU)")
    args = parser.parse_args()
    console = Console()
    console.print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
                  + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no CUDA"))
    for name in args.devices:
        device = torch.device(name)
        compare_with_hand_loop(device, args, console)
        if device.type == "cuda":
            compare_precisions(device, args, console)


if __name__ == "__main__":
    main()
