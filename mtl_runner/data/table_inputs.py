"""A table's input columns as one float32 matrix: numeric columns standardised with the
training split's statistics, declared categorical columns one-hot over its categories.

Built for speed on large tables (docs/own-data.md#throughput): a table held in memory is
read by :func:`numeric_matrices` in one pass, a few thousand rows of the file at a time
transposed in cache and gathered row by row into each split's matrix, its moments taken
there (shifted float32 sums combined in float64, which also find a non-finite value), then
standardised in place. A streamed Parquet file is read the same way a row group at a time;
chunks and row groups combine their statistics exactly as one block would
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
#: File rows read per step of :func:`numeric_matrices`: at fifty float32 columns, the step's
#: scratches hold 800 KiB each, which a core's cache keeps while they are transposed,
#: gathered and summed (measured: larger steps were no faster, smaller ones paid per call).
CHUNK_ROWS = 4096


def is_numeric_column(data: Columns, name: str) -> bool:
    if isinstance(data, pa.Table):
        kind = data.schema.field(name).type
        return pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)
    return pd.api.types.is_numeric_dtype(data[name]) or pd.api.types.is_bool_dtype(data[name])


def _finite_sums(block: np.ndarray, columns: Sequence[str], where: str, split: str, rows: np.ndarray) -> np.ndarray:
    """Each column's float64 sum of a ``(len(columns), n)`` block; a non-finite input is one
    line naming the column and its file row (``rows``, counted from 0)."""
    sums = block.sum(axis=1, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(sums))
    if len(bad):
        j = int(bad[0])
        i = int(np.flatnonzero(~np.isfinite(block[j]))[0])
        row = int(rows[i])
        raise ConfigError(f"{where}: input column {columns[j]!r} row {row + 1} ({split}): {float(block[j, i])}; "
                          "inputs must be finite numbers (drop or impute the row)")
    return sums


def _aligned_columns(data: Columns, columns: Sequence[str]) -> Iterator[tuple[int, list[np.ndarray]]]:
    """``columns`` as numpy arrays over row ranges they all share, each range with its first
    row: a pyarrow table by record batch (zero-copy for a float column without nulls; a null
    becomes NaN, a boolean 0 / 1), a pandas frame whole."""
    if not columns:
        return
    if isinstance(data, pa.Table):
        start = 0
        for batch in data.select(list(columns)).to_batches():
            arrays = [column.cast(pa.float64()) if column.null_count else column for column in batch.columns]
            yield start, [_assignable(array.to_numpy(zero_copy_only=False)) for array in arrays]
            start += batch.num_rows
    else:
        yield 0, [data[c].to_numpy(dtype=np.float32, na_value=np.nan) for c in columns]


def _assignable(values: np.ndarray) -> np.ndarray:
    return values.view(np.uint8) if values.dtype == np.bool_ else values


def numeric_matrices(
    data: Columns, columns: Sequence[str], rows: Mapping[str, np.ndarray | None], width: int, where: str,
    first_row: int = 0,
) -> dict[str, tuple[Tensor, Moments]]:
    """Per entry of ``rows`` (sorted row numbers; ``None``: every row): a row-major
    ``(n, width)`` float32 matrix whose first ``len(columns)`` columns hold those rows of the
    numeric ``columns`` as read (standardised later, in place, by
    :meth:`InputEncoder.standardise`), and the moments of those values. A non-finite value
    is one line naming its file row: ``first_row`` is the file row of ``data``'s first (a
    streamed row group's). The one reading path of a table's numeric inputs: in memory,
    streamed row group by row group, and the preflight's sample.

    Why this shape: :data:`CHUNK_ROWS` rows of the file at a time are copied column by column
    into a scratch and transposed into a row-major scratch, both small enough to stay in
    cache; each entry's rows are then gathered from it whole (one copy per row, not one per
    value) straight into the matrix, and their moments taken while they are still in cache.
    Every value is read from the file's columns once and written to the matrix once, which
    a column-major block transposed afterwards cannot do."""
    index = {key: np.arange(_num_rows(data)) if at is None else at for key, at in rows.items()}
    k = len(columns)
    # torch's allocation, not numpy's: numpy asks for huge pages, whose first touch can stall on compaction
    matrices = {key: torch.empty(len(at), width).numpy() for key, at in index.items()}
    moments = {key: Moments.empty(k) for key in index}
    # scratches allocated once: a block of this size allocated per chunk can cost a fresh mapping and its page faults
    by_column = np.empty((k, CHUNK_ROWS), dtype=np.float32)
    by_row = torch.empty(CHUNK_ROWS, k)
    gathered, shifted = np.empty((CHUNK_ROWS, k), dtype=np.float32), np.empty((CHUNK_ROWS, k), dtype=np.float32)
    for start, arrays in _aligned_columns(data, columns):
        for first in range(0, len(arrays[0]), CHUNK_ROWS):
            last = min(first + CHUNK_ROWS, len(arrays[0]))
            for j, values in enumerate(arrays):
                by_column[j, :last - first] = values[first:last]
            by_row[:last - first].copy_(torch.from_numpy(by_column[:, :last - first]).t())
            for key, at in index.items():
                lo, hi = np.searchsorted(at, (start + first, start + last))
                if hi == lo:
                    continue
                rows_here = gathered[:hi - lo]
                np.take(by_row.numpy(), at[lo:hi] - (start + first), axis=0, out=rows_here, mode="clip")  # in range: no bounds check
                file_rows = at[lo:hi] + first_row
                moments[key] = moments[key].merge(Moments.of_rows(rows_here, shifted[:hi - lo], columns, where, key, file_rows))
                matrices[key][lo:hi, :k] = rows_here
    return {key: (torch.from_numpy(matrices[key]), moments[key]) for key in index}


def _num_rows(data: Columns) -> int:
    return data.num_rows if isinstance(data, pa.Table) else len(data)


@dataclass(frozen=True)
class Moments:
    """Count, mean and centred sum of squares per column (float64), of one block or of
    several merged (Chan, Golub and LeVeque's pairwise update)."""

    count: int
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def of_rows(cls, rows: np.ndarray, shifted: np.ndarray, columns: Sequence[str], where: str, split: str,
                file_rows: np.ndarray) -> Moments:
        """The moments of each column of a row-major block small enough to sit in cache; a
        non-finite value is one line naming its column and row in the file. Sums of the
        values less the block's first row (the shifted-data formula: no cancellation when
        a column's mean is far from zero), in float32 by matrix-vector products whose
        rounding is far below the data's own, combined in float64; ``shifted`` is a scratch
        of the block's shape."""
        count = len(rows)
        shift = rows[0].astype(np.float64)
        ones = np.ones(count, dtype=np.float32)
        with np.errstate(over="ignore", invalid="ignore"):  # float32 overflow: settled in float64 below
            np.subtract(rows, rows[0], out=shifted)
            total = (ones @ shifted).astype(np.float64)
            np.multiply(shifted, shifted, out=shifted)
            squares = (ones @ shifted).astype(np.float64)
        if not (np.isfinite(total).all() and np.isfinite(squares).all()):  # a NaN, an infinity, or values near float32's limit
            exact = rows.T.astype(np.float64) - shift[:, None]
            total = _finite_sums(exact, columns, where, split, file_rows)
            squares = np.einsum("ij,ij->i", exact, exact)
        return cls(count, shift + total / count, np.maximum(squares - total * total / count, 0.0))

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

    def standardise(self, matrix: Tensor, codes: Sequence[Tensor]) -> Tensor:
        """``matrix`` ``(n, width)``, whose first columns hold the raw numeric inputs, made
        the model's inputs in place: those columns standardised, the rest one-hot."""
        matrix[:, :len(self.numeric)].sub_(self.mean).div_(self.std)
        start = len(self.numeric)
        for code, categories in zip(codes, self.categories.values()):
            one_hot = matrix[:, start:start + len(categories)]
            one_hot.zero_()
            labelled = code >= 0
            one_hot[labelled.nonzero().squeeze(1), code[labelled]] = 1.0
            start += len(categories)
        return matrix

    def state(self) -> dict[str, Any]:
        return {
            "numeric": {c: {"mean": m, "std": s} for c, m, s in zip(self.numeric, self.mean.tolist(), self.std.tolist())},
            "categorical": self.categories,
        }
