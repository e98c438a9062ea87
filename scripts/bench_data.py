"""Throughput of the own-data pipeline against hand-written equivalents, side by side.

1. Loading a table: ``dataset=table`` (read, split, standardise, encode targets, tensors)
   against ``pandas.read_parquet`` plus one copy into tensors, in rows/s, on a generated
   ``--rows`` x ``--cols`` Parquet file with three target columns (binary, regression,
   5-class classification). Each load runs in a fresh Python process, as a run loads its
   table once (``--repeats`` processes per side, alternating; imports not timed); a second
   row repeats both in one process after an untimed first load, where the allocators'
   warm pools favour a repeated read.
2. Training one epoch on that table: the trainer (built by ``assemble.build_run`` as
   ``mtl-run dataset=table backbone=mlp`` wires it, uniform weights, no surgery, diagnostics
   as ``--diagnostics`` says, the non-finite guard, the learning-rate schedule, and the
   epoch's validation with its metrics on 1 % of the rows; no TensorBoard files and no
   checkpoint, which the hand-written side would not write either) against a hand-written
   loop over the same tensors (same model and initial weights, same batch size, AdamW:
   permutation, index, forward, summed task losses, backward, step). Each side is timed
   from its call to the end of the epoch; building the trainer is not timed.
   With ``--stream``, also one pass over the training split streamed from the Parquet file
   (``dataset.memory_budget_mb`` below the file's size: row groups read, encoded and
   shuffled per window) against the same split held in memory, in rows/s.
3. Reading images: ``dataset=image_table``'s training split against a hand-written
   ``ImageFolder``-style loop (a ``Dataset`` opening each file with PIL, resize, to tensor,
   normalise; a DataLoader with the same batch size and workers) on the same ``--images``
   PNG files, in images/s.

Each measurement is the median of ``--repeats`` alternating runs (a shared machine is noisy);
each starts with one untimed run of either side.
``--threads`` sets torch's intra-op threads for both sides (on a loaded machine one thread
is steadier: two threads that wait for each other's core slow every parallel kernel).

    python scripts/bench_data.py                         # 1,000,000 x 50 table, 2,000 images
    python scripts/bench_data.py --rows 100000 --images 500 --repeats 1   # a quick pass
    python scripts/bench_data.py --only train --threads 1                # one of the three

``--only load|train|images`` runs one measurement (``train`` still builds the table once,
untimed).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from hydra import compose, initialize_config_dir
from PIL import Image
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2 as transforms

from mtl_runner.assemble import build_run
from mtl_runner.config import CONF_DIR
from mtl_runner.data.base import TaskSet, TensorSplit, default_num_workers
from mtl_runner.data.image_table import IMAGENET_MEAN, IMAGENET_STD, image_table
from mtl_runner.data.table import table
from mtl_runner.train.logger import RunLogger

TASKS = {"flag": {"kind": "binary"}, "amount": {"kind": "regression"}, "group": {"kind": "classification"}}


def alternating_rates(count: int, ours: Callable[[], object], theirs: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Both sides' median rates over ``repeats`` alternating runs, after one untimed run of
    each: the first read of a file in a process pays for warming pyarrow's memory pool and
    the page cache, which the side timed second would otherwise get for free."""
    ours(), theirs()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for run, spent in zip((ours, theirs), times):
            start = time.perf_counter()
            run()
            spent.append(time.perf_counter() - start)
    return count / statistics.median(times[0]), count / statistics.median(times[1])


def write_table(path: Path, rows: int, cols: int) -> None:
    rng = np.random.default_rng(0)
    features = rng.standard_normal((rows, cols), dtype=np.float32)
    frame = pd.DataFrame(features, columns=[f"x{i}" for i in range(cols)])
    frame["flag"] = (features[:, 0] + features[:, 1] > 0).astype(np.int8)
    frame["amount"] = features[:, 2] * 2.0 + features[:, 3]
    frame["group"] = np.digitize(features[:, 4], [-1.0, -0.3, 0.3, 1.0]).astype(np.int64)
    frame.to_parquet(path, row_group_size=100_000)


def load_once(side: str, path: Path) -> tuple[object, float]:
    """One load of ``path`` by ``side`` (``ours`` or ``pandas``) and its seconds."""
    start = time.perf_counter()
    loaded = table(str(path), TASKS, split=(0.98, 0.01, 0.01)) if side == "ours" else pandas_load(path)
    return loaded, time.perf_counter() - start


def fresh_process_rates(count: int, path: Path, repeats: int, threads: int | None) -> tuple[float, float]:
    """Both sides' median rates over ``repeats`` loads each, every one in a new process
    (alternating sides): what a run pays, with no pool or page warmed by an earlier load."""
    times: dict[str, list[float]] = {"ours": [], "pandas": []}
    for _ in range(repeats):
        for side, spent in times.items():
            command = [sys.executable, __file__, "--load-once", side, "--table", str(path)]
            if threads is not None:
                command += ["--threads", str(threads)]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            spent.append(float(output.split()[-1]))
    return count / statistics.median(times["ours"]), count / statistics.median(times["pandas"])


def pandas_load(path: Path) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    frame = pd.read_parquet(path)
    inputs = torch.tensor(frame.drop(columns=list(TASKS)).to_numpy(np.float32))
    return inputs, {name: torch.tensor(frame[name].to_numpy()) for name in TASKS}


def hand_written_epoch(model: torch.nn.Module, taskset: TaskSet, batch_size: int, lr: float) -> None:
    split = taskset.train
    assert isinstance(split, TensorSplit)
    tasks = taskset.tasks
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    order = torch.randperm(len(split))
    for start in range(0, len(split), batch_size):
        index = order[start:start + batch_size]
        x = split.inputs.index_select(0, index)
        outputs = model(x)
        loss = sum(task.loss(outputs[task.name], split.targets[task.name].index_select(0, index)) for task in tasks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


class ImageFolderStyle(Dataset):
    """What a hand-written loop over the same files does: PIL, resize, tensor, normalise."""

    def __init__(self, root: Path, files: list[str], labels: np.ndarray, size: int) -> None:
        self.root, self.files, self.labels = root, files, labels
        self.transform = transforms.Compose([
            transforms.PILToTensor(), transforms.Resize([size, size], antialias=True),
            transforms.ToDtype(torch.float32, scale=True), transforms.Normalize(list(IMAGENET_MEAN), list(IMAGENET_STD)),
        ])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.root / self.files[index]) as image:
            return self.transform(image.convert("RGB")), int(self.labels[index])


def write_images(root: Path, count: int, size: int) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        name = f"img/{i:05d}.png"
        Image.fromarray(pixels).save(root / name)
        rows.append({"path": name, "label": i % 10, "odd": i % 2})
    frame = pd.DataFrame(rows)
    frame.to_csv(root / "labels.csv", index=False)
    return frame


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--cols", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--image-size", type=int, default=64, help="stored size; both loaders resize to 32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--diagnostics", choices=["default", "off"], default="default")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--stream", action="store_true", help="also time a streamed pass over the training split")
    parser.add_argument("--only", choices=["load", "train", "images"], help="run one of the three measurements")
    parser.add_argument("--load-once", choices=["ours", "pandas"], help=argparse.SUPPRESS)  # one cold load, for the parent
    parser.add_argument("--table", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.load_once:
        print(load_once(args.load_once, args.table)[1])
        return
    console = Console()
    results = Table(title=f"bench_data ({torch.get_num_threads()} threads, {default_num_workers()} loader workers)")
    for column in ("measurement", "ours", "hand-written", "ratio", "target"):
        results.add_column(column)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "table.parquet"
        write_table(path, args.rows, args.cols)
        build = lambda: table(str(path), TASKS, split=(0.98, 0.01, 0.01))  # noqa: E731
        if args.only in (None, "load"):
            ours, theirs = fresh_process_rates(args.rows, path, args.repeats, args.threads)
            results.add_row("load table in a fresh process, rows/s", f"{ours:,.0f}", f"{theirs:,.0f}", f"{ours / theirs:.2f}x", ">= 1.0x")
            ours, theirs = alternating_rates(args.rows, build, lambda: pandas_load(path), args.repeats)
            results.add_row("load table again in the same process, rows/s", f"{ours:,.0f}", f"{theirs:,.0f}", f"{ours / theirs:.2f}x", "-")
        if args.only in (None, "train"):
            train_rows(results, build(), path, args)
        if args.only in (None, "images"):
            image_rows(results, Path(tmp) / "images", args)
    console.print(results)


def train_rows(results: Table, taskset: TaskSet, path: Path, args: argparse.Namespace) -> None:
    """One epoch, trainer against the hand-written loop (and, with ``--stream``, a streamed
    pass against the split in memory). Each run starts from a fresh copy of the same
    initial model; one untimed run of either side comes first, as in
    :func:`alternating_rates` (a process's first epoch also pays for first-touched pages)."""
    overrides = ["dataset=table", "backbone=mlp", "trainer.epochs=1", f"trainer.batch_size={args.batch_size}",
                 "trainer.progress=off", "trainer.device=cpu", "baseline=off"]
    if args.diagnostics == "off":
        overrides.append("diagnostics=off")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    torch.manual_seed(0)
    reference = build_run(cfg, None, taskset=taskset, logger=RunLogger(None), console=Console(quiet=True)).model
    lr = float(cfg.optimizer.lr)
    trainer_times: list[float] = []
    loop_times: list[float] = []
    for _ in range(args.repeats + 1):
        trainer = build_run(cfg, None, taskset=taskset, model=copy.deepcopy(reference), logger=RunLogger(None),
                            console=Console(quiet=True)).trainer
        start = time.perf_counter()
        trainer.fit()
        trainer_times.append(time.perf_counter() - start)
        model = copy.deepcopy(reference).train()
        start = time.perf_counter()
        hand_written_epoch(model, taskset, args.batch_size, lr)
        loop_times.append(time.perf_counter() - start)
    del trainer_times[0], loop_times[0]  # the untimed first run of either side
    n = len(taskset.train)
    ours, theirs = n / statistics.median(trainer_times), n / statistics.median(loop_times)
    results.add_row(f"train one epoch (mlp, diagnostics {args.diagnostics}), rows/s", f"{ours:,.0f}", f"{theirs:,.0f}",
                    f"{ours / theirs:.2f}x", ">= 0.9x")
    if args.stream:
        budget = path.stat().st_size / 2**20 / 4  # well below the file's uncompressed size: it streams
        streamed = table(str(path), TASKS, split=(0.98, 0.01, 0.01), memory_budget_mb=budget).train
        cpu = torch.device("cpu")
        one_pass = lambda split: lambda: [None for _ in split.batches(args.batch_size, shuffle=True, generator=torch.Generator(), device=cpu)]  # noqa: E731
        ours, theirs = alternating_rates(n, one_pass(streamed), one_pass(taskset.train), args.repeats)
        results.add_row(f"stream the training split once ({budget:.0f} MiB budget), rows/s", f"{ours:,.0f}",
                        f"{theirs:,.0f} (in memory)", f"{ours / theirs:.2f}x", "-")


def image_rows(results: Table, root: Path, args: argparse.Namespace) -> None:
    """``image_table``'s training split against an ``ImageFolder``-style DataLoader."""
    frame = write_images(root, args.images, args.image_size)
    images = image_table(str(root), "labels.csv", {"label": {"kind": "classification"}, "odd": {"kind": "binary"}},
                         image_size=32, split=(1.0, 0.0, 0.0))
    split = images.train
    cpu = torch.device("cpu")
    ours_pass = lambda: [None for _ in split.batches(64, shuffle=True, generator=torch.Generator(), device=cpu)]  # noqa: E731
    dataset = ImageFolderStyle(root, frame["path"].tolist(), frame["label"].to_numpy(), 32)
    loader = lambda: [None for _ in DataLoader(dataset, batch_size=64, shuffle=True, num_workers=split.num_workers)]  # noqa: E731
    ours, theirs = alternating_rates(args.images, ours_pass, loader, args.repeats)
    results.add_row(f"read images ({args.image_size}px PNG -> 32px), images/s", f"{ours:,.0f}", f"{theirs:,.0f}",
                    f"{ours / theirs:.2f}x", ">= 0.9x")


if __name__ == "__main__":
    main()
