"""A table's input columns as one float32 matrix: numeric columns standardised with the
training split's statistics, declared categorical columns one-hot over its categories.

Built for speed on large tables (docs/own-data.md#throughput): the numeric columns are read
from pyarrow column by column (zero-copy where the file's type is float32) into one
column-major block per split; the statistics are two vectorised passes over that block
(float64 sums, which also detect a non-finite value: float32 values summed in float64
cannot overflow, so a sum is non-finite exactly when its column holds a NaN or an
infinity; then the centred sum of squares); the standardisation writes the row-major
result in one transposing pass. Blocks of rows seen one at a time (a streamed Parquet
file's row groups) combine their statistics exactly as one block would
(:meth:`Moments.merge`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from torch import Tensor

from mtl_runner.errors import ConfigError


Columns = pa.Table | pd.DataFrame


def is_numeric_column(data: Columns, name: str) -> bool:
    if isinstance(data, pa.Table):
        kind = data.schema.field(name).type
        return pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)
    return pd.api.types.is_numeric_dtype(data[name]) or pd.api.types.is_bool_dtype(data[name])


def _pieces(data: Columns, name: str) -> Iterator[tuple[int, np.ndarray]]:
    """A column as numpy arrays, each with its first row: a pyarrow column chunk by chunk
    (zero-copy for a float column without nulls; a null becomes NaN), a pandas one whole."""
    if isinstance(data, pa.Table):
        column = data.column(name)
        start = 0
        for chunk in (column if column.null_count == 0 else column.cast(pa.float64())).chunks:
            yield start, chunk.to_numpy(zero_copy_only=False)
            start += len(chunk)
    else:
        yield 0, data[name].to_numpy(dtype=np.float32, na_value=np.nan)


def numeric_blocks(data: Columns, columns: Sequence[str], rows: Mapping[str, np.ndarray | None]) -> dict[str, Tensor]:
    """``columns`` of ``data`` at each entry's ``rows`` (``None``: all rows) as a
    ``(len(columns), n)`` float32 block, one contiguous row per column; a missing cell is
    NaN. Each column is read once, piece by piece, for all entries."""
    total = data.num_rows if isinstance(data, pa.Table) else len(data)
    # torch's allocation, not numpy's: numpy asks for huge pages, whose first touch can stall on compaction
    blocks = {key: torch.empty(len(columns), total if index is None else len(index)).numpy() for key, index in rows.items()}
    local: dict[tuple[str, int, int], tuple[int, int, np.ndarray]] = {}  # the pieces' row positions, shared by columns
    for j, name in enumerate(columns):
        for start, values in _pieces(data, name):
            stop = start + len(values)
            values = values.view(np.uint8) if values.dtype == np.bool_ else values
            for key, index in rows.items():
                if index is None:
                    blocks[key][j, start:stop] = values
                    continue
                if (key, start, stop) not in local:
                    lo, hi = np.searchsorted(index, (start, stop))
                    local[key, start, stop] = (lo, hi, index[lo:hi] - start)
                lo, hi, at = local[key, start, stop]
                if values.dtype == np.float32:
                    np.take(values, at, out=blocks[key][j, lo:hi], mode="clip")  # positions are in range: no bounds check
                else:
                    blocks[key][j, lo:hi] = values[at]
    return {key: torch.from_numpy(block) for key, block in blocks.items()}


def column_sums(block: Tensor, columns: Sequence[str], where: str, split: str, rows: np.ndarray | None = None) -> np.ndarray:
    """Each column's float64 sum; a non-finite input is one line naming the column and row
    (``rows``: the block's row numbers in the file, counted from 0; default its own)."""
    sums = block.numpy().sum(axis=1, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(sums))
    if len(bad):
        j = int(bad[0])
        i = int(np.flatnonzero(~np.isfinite(block[j].numpy()))[0])
        row = int(rows[i]) if rows is not None else i
        raise ConfigError(f"{where}: input column {columns[j]!r} row {row + 1} ({split}): {float(block[j, i])}; "
                          "inputs must be finite numbers (drop or impute the row)")
    return sums


@dataclass(frozen=True)
class Moments:
    """Count, mean and centred sum of squares per column (float64), of one block or of
    several merged (Chan, Golub and LeVeque's pairwise update)."""

    count: int
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def of(cls, block: Tensor, sums: np.ndarray) -> Moments:
        count = block.shape[1]
        mean = sums / max(count, 1)
        m2 = np.empty_like(mean)
        for j, values in enumerate(block.numpy()):  # a column at a time: no block-sized temporary
            centred = values - np.float32(mean[j])
            m2[j] = np.dot(centred, centred)
        return cls(count, mean, m2)

    @classmethod
    def empty(cls, width: int) -> Moments:
        return cls(0, np.zeros(width), np.zeros(width))

    def merge(self, other: Moments) -> Moments:
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        count = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / count)
        m2 = self.m2 + other.m2 + delta * delta * (self.count * other.count / count)
        return Moments(count, mean, m2)


def category_codes(values: pd.Series, categories: Sequence[str]) -> Tensor:
    """Each cell's index among ``categories`` (-1: missing or not a training category)."""
    text = values.astype(str).where(values.notna())
    text = text.where(text.isin(list(categories)))
    return torch.from_numpy(pd.Categorical(text, categories=list(categories)).codes.astype(np.int64))


class InputEncoder:
    """The fitted encoding of a table's inputs: numeric columns standardised with the
    training split's mean and (population) standard deviation, a constant column only
    centred; categorical columns one-hot over the training split's categories (an unseen
    one is all zeros). :meth:`state` is what the run directory keeps
    (``data_summary.json``) and :meth:`from_state` reads it back."""

    def __init__(self, numeric: Sequence[str], mean: Tensor, std: Tensor, categories: Mapping[str, Sequence[str]]) -> None:
        self.numeric = list(numeric)
        self.mean = mean
        self.std = std
        self.categories = {name: list(values) for name, values in categories.items()}

    @classmethod
    def fit(cls, numeric: Sequence[str], moments: Moments, categories: Mapping[str, Sequence[str]]) -> InputEncoder:
        variance = moments.m2 / max(moments.count, 1)
        std = np.where(variance > 0, np.sqrt(variance), 1.0)
        return cls(numeric, torch.from_numpy(moments.mean).float(), torch.from_numpy(std).float(), categories)

    @classmethod
    def from_state(cls, state: Mapping[str, Any], numeric: Sequence[str], categorical: Sequence[str], where: str) -> InputEncoder:
        """The encoder an earlier run fitted; its columns must be this table's inputs."""
        saved_numeric, saved_categorical = list(state.get("numeric", {})), list(state.get("categorical", {}))
        if saved_numeric != list(numeric) or saved_categorical != list(categorical):
            raise ConfigError(
                f"{where}: the saved input statistics are for columns {saved_numeric + saved_categorical}, "
                f"but this table's inputs are {list(numeric) + list(categorical)}"
            )
        stats = state["numeric"]
        mean = torch.tensor([float(stats[c]["mean"]) for c in numeric], dtype=torch.float32)
        std = torch.tensor([float(stats[c]["std"]) for c in numeric], dtype=torch.float32)
        return cls(numeric, mean, std, state["categorical"])

    @property
    def width(self) -> int:
        return len(self.numeric) + sum(len(v) for v in self.categories.values())

    def encode(self, numeric: Tensor, codes: Sequence[Tensor]) -> Tensor:
        """The model's inputs ``(n, width)`` from a ``(len(numeric), n)`` block and one code
        vector per categorical column."""
        count = numeric.shape[1]
        out = torch.empty(count, self.width)
        standardised = out[:, :len(self.numeric)]
        torch.sub(numeric.t(), self.mean, out=standardised)
        standardised.div_(self.std)
        start = len(self.numeric)
        for code, categories in zip(codes, self.categories.values()):
            one_hot = out[:, start:start + len(categories)]
            one_hot.zero_()
            labelled = code >= 0
            one_hot[labelled.nonzero().squeeze(1), code[labelled]] = 1.0
            start += len(categories)
        return out

    def state(self) -> dict[str, Any]:
        return {
            "numeric": {c: {"mean": m, "std": s} for c, m, s in zip(self.numeric, self.mean.tolist(), self.std.tolist())},
            "categorical": self.categories,
        }
