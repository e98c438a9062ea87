"""A Parquet table larger than ``dataset.memory_budget_mb``, streamed by row group.

What a table needs per row besides its numeric inputs (the targets, the split column, the
categorical inputs' codes) is a few numbers, read once and kept in memory exactly as the
in-memory path keeps them (same split, same target encoding, same categories). The
numeric inputs, the bulk of a wide table, stay on disk: a first pass over the row groups
fits their statistics (read as in memory, by
:func:`~mtl_runner.data.table_inputs.numeric_matrices`, a row group at a time, so they equal
the in-memory statistics up to float rounding) and checks every
value is finite; each pass over a split then reads its row groups in a seeded random order,
a window of them at a time (as many as fill a quarter of the budget), shuffles the rows
within the window and cuts batches, carrying a window's last partial batch into the next:
every row once per epoch and ``ceil(rows / batch_size)`` batches, as in memory. The reading
and encoding run in a DataLoader worker when the machine has a core to spare
(:func:`~mtl_runner.data.base.default_num_workers`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from mtl_runner.data.base import Batch, default_num_workers
from mtl_runner.data.table_inputs import InputEncoder, Moments, numeric_matrices
from mtl_runner.errors import ConfigError

#: Share of the memory budget a pass's shuffle window may fill with encoded inputs.
WINDOW_SHARE = 0.25


def open_if_over_budget(file: Path, memory_budget_mb: float) -> pq.ParquetFile | None:
    """The Parquet file to stream when its uncompressed data (the file's own metadata)
    exceed the budget; ``None``: read it into memory."""
    if not memory_budget_mb > 0:
        raise ConfigError(f"dataset.memory_budget_mb={memory_budget_mb}: a positive number of MiB")
    if file.suffix.lower() != ".parquet":
        return None
    parquet = pq.ParquetFile(file)
    size = sum(parquet.metadata.row_group(g).total_byte_size for g in range(parquet.num_row_groups))
    return parquet if size > memory_budget_mb * 2**20 else None


def row_group_starts(parquet: pq.ParquetFile) -> np.ndarray:
    """The first row of each row group, and the row count at the end."""
    sizes = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
    return np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])


def first_pass(parquet: pq.ParquetFile, numeric: Sequence[str], rows: dict[str, np.ndarray], file: str) -> Moments:
    """The training rows' statistics over all row groups; every split's values checked."""
    starts = row_group_starts(parquet)
    moments = Moments.empty(len(numeric))
    for group in range(parquet.num_row_groups):
        data = parquet.read_row_group(group, columns=list(numeric))
        here = {name: split_rows[slice(*np.searchsorted(split_rows, starts[group:group + 2]))] for name, split_rows in rows.items()}
        local = {name: file_rows - starts[group] for name, file_rows in here.items()}
        read = numeric_matrices(data, numeric, local, len(numeric), file, first_row=int(starts[group]))  # checks every split
        moments = moments.merge(read["train"][1])
    return moments


class StreamSplit:
    """One split of a streamed table: its rows (file order), their targets and category
    codes in memory, their numeric inputs read from the file at each pass."""

    def __init__(self, path: Path, parquet: pq.ParquetFile, numeric: Sequence[str], rows: np.ndarray, encoder: InputEncoder,
                 codes: Sequence[Tensor], targets: dict[str, Tensor], memory_budget_mb: float) -> None:
        self.path = path
        self.numeric = list(numeric)
        self.rows = rows
        self.encoder = encoder
        self.codes = list(codes)
        self.targets = targets
        self.starts = row_group_starts(parquet)
        self.bounds = np.searchsorted(rows, self.starts)  # split positions of each row group: [bounds[g], bounds[g + 1])
        self.window_rows = max(1, int(WINDOW_SHARE * memory_budget_mb * 2**20 / (4 * max(encoder.width, 1))))
        self.num_workers = min(1, default_num_workers())

    def __len__(self) -> int:
        return len(self.rows)

    def batches(
        self, batch_size: int, *, shuffle: bool, generator: torch.Generator | None, device: torch.device
    ) -> Iterator[Batch]:
        groups = [g for g in range(len(self.starts) - 1) if self.bounds[g + 1] > self.bounds[g]]
        seed = None
        if shuffle:
            groups = [groups[i] for i in torch.randperm(len(groups), generator=generator).tolist()]
            seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        loader = DataLoader(_Passes(self, groups, seed, batch_size), batch_size=None, num_workers=self.num_workers,
                            pin_memory=device.type == "cuda")
        for x, y in loader:
            yield x.to(device, non_blocking=True), {k: v.to(device, non_blocking=True) for k, v in y.items()}

    def windows(self, groups: Sequence[int]) -> Iterator[list[int]]:
        """``groups`` in runs that hold at most :attr:`window_rows` rows (at least one group)."""
        window: list[int] = []
        rows = 0
        for group in groups:
            size = int(self.bounds[group + 1] - self.bounds[group])
            if window and rows + size > self.window_rows:
                yield window
                window, rows = [], 0
            window.append(group)
            rows += size
        if window:
            yield window

    def read(self, parquet: pq.ParquetFile, group: int) -> tuple[Tensor, Tensor]:
        """A row group's rows of this split: encoded inputs and their split positions."""
        lo, hi = int(self.bounds[group]), int(self.bounds[group + 1])
        data = parquet.read_row_group(group, columns=self.numeric)
        local = self.rows[lo:hi] - self.starts[group]
        matrix, _ = numeric_matrices(data, self.numeric, {"rows": local}, self.encoder.width, str(self.path),
                                     first_row=int(self.starts[group]))["rows"]
        return self.encoder.standardise(matrix, [code[lo:hi] for code in self.codes]), torch.arange(lo, hi)


class _Passes(IterableDataset):
    """One pass over a split's row groups in the given order, as batches."""

    def __init__(self, split: StreamSplit, groups: list[int], seed: int | None, batch_size: int) -> None:
        self.split, self.groups, self.seed, self.batch_size = split, groups, seed, batch_size

    def __iter__(self) -> Iterator[Batch]:
        split, size = self.split, self.batch_size
        parquet = pq.ParquetFile(split.path)
        shuffle = np.random.default_rng(self.seed) if self.seed is not None else None
        carry_x, carry_at = torch.empty(0, split.encoder.width), torch.empty(0, dtype=torch.long)
        for window in split.windows(self.groups):
            read = [split.read(parquet, group) for group in window]
            x = torch.cat([carry_x, *(part for part, _ in read)])
            at = torch.cat([carry_at, *(positions for _, positions in read)])
            if shuffle is not None:
                order = torch.from_numpy(shuffle.permutation(len(at)))
                x, at = x.index_select(0, order), at.index_select(0, order)
            full = len(at) // size * size
            for start in range(0, full, size):
                yield self._batch(x[start:start + size], at[start:start + size])
            carry_x, carry_at = x[full:], at[full:]
        if len(carry_at):
            yield self._batch(carry_x, carry_at)

    def _batch(self, x: Tensor, at: Tensor) -> Batch:
        return x, {name: target.index_select(0, at) for name, target in self.split.targets.items()}
