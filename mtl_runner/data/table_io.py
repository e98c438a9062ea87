"""Reading a table file and splitting its rows: the part of the table machinery
(:mod:`mtl_runner.data.table`) that ``table``, ``image_table`` and ``text_table`` and the
streamed Parquet path (:mod:`mtl_runner.data.table_stream`) share.

Splits are row indices in file order, by a ``split_column`` (values ``train`` / ``val``
(``validation``) / ``test``) or by seeded ratios, so that a table held in memory and the
same table streamed split alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mtl_runner.data.roots import expand_root
from mtl_runner.errors import ConfigError, DatasetRootError

SPLITS = ("train", "val", "test")
#: Rows read by the preflight to check values, not only the header.
SAMPLE_ROWS = 1000


def _reading(file: Path, read: Callable[[], Any]) -> Any:
    """``read()``'s result, its parse errors as one line naming the file; read into
    :func:`system_memory_pool`."""
    try:
        with system_memory_pool():
            return read()
    except (ValueError, OSError) as exc:  # pandas / pyarrow parse errors
        raise ConfigError(f"{file}: cannot be read as a {file.suffix.lower()[1:]} table ({str(exc).splitlines()[0]})") from None


@contextmanager
def system_memory_pool() -> Iterator[None]:
    """pyarrow allocates from the C library's allocator meanwhile, instead of its default
    pool. Why: a run reads its table once, in a fresh process, and on the Linux machine we
    measured (transparent huge pages on request), after a read into the default pool
    (mimalloc) every large numpy allocation stalled, about 0.4 s per 200 MB: the read alone is
    faster with mimalloc, the load as a whole slower (docs/own-data.md#throughput). Buffers
    keep the pool they came from, so restoring the default afterwards is safe."""
    previous = pa.default_memory_pool()
    pa.set_memory_pool(pa.system_memory_pool())
    try:
        yield
    finally:
        pa.set_memory_pool(previous)


def table_file(path: str | Path) -> Path:
    """The file of ``dataset.path`` (its root expanded), which must exist and be a table."""
    file = expand_root(str(path))
    if not file.is_file():
        raise DatasetRootError(f"dataset.path={path}: no such file; expected a .csv, .tsv or .parquet table")
    if file.suffix.lower() not in (".csv", ".tsv", ".parquet"):
        raise ConfigError(f"dataset.path={path}: unknown table format {file.suffix.lower()!r}; allowed: .csv, .tsv, .parquet")
    return file


def read_frame(path: str | Path, nrows: int | None = None) -> pd.DataFrame:
    """One ``.csv`` / ``.tsv`` / ``.parquet`` file; ``nrows`` reads only the first rows."""
    file = table_file(path)
    if file.suffix.lower() == ".parquet":
        if nrows is None:
            return _reading(file, lambda: pd.read_parquet(file))
        first = _reading(file, lambda: next(pq.ParquetFile(file).iter_batches(batch_size=nrows), None))
        return first.to_pandas() if first is not None else _reading(file, lambda: pd.read_parquet(file))
    return _reading(file, lambda: pd.read_csv(file, sep="\t" if file.suffix.lower() == ".tsv" else ",", nrows=nrows))


def read_columns(path: str | Path) -> pa.Table | pd.DataFrame:
    """A whole file for :func:`table`: Parquet as a pyarrow table (its columns reach numpy
    without a copy), CSV / TSV as a pandas frame."""
    file = table_file(path)
    if file.suffix.lower() == ".parquet":
        return _reading(file, lambda: pq.read_table(file))
    return read_frame(file)


def split_rows(num_rows: int, ratios: Sequence[float], seed: int) -> dict[str, np.ndarray]:
    """Row indices of train / val / test drawn by a seeded permutation in ``ratios``."""
    if len(ratios) != 3 or any(r < 0 for r in ratios) or not math.isclose(sum(ratios), 1.0, abs_tol=1e-6):
        raise ConfigError(f"dataset.split={list(ratios)}: three non-negative fractions (train, val, test) summing to 1")
    order = np.random.default_rng(seed).permutation(num_rows)
    ends = np.round(np.cumsum(ratios) * num_rows).astype(int)
    which = np.full(num_rows, len(SPLITS), dtype=np.uint8)  # each row's split: sorted indices without a sort
    for code, (start, end) in enumerate(zip((0, ends[0], ends[1]), ends)):
        which[order[start:end]] = code
    return {name: np.flatnonzero(which == code) for code, name in enumerate(SPLITS)}


def split_indices(frame: pd.DataFrame, split_column: str | None, split: Sequence[float], seed: int, file: str) -> dict[str, np.ndarray]:
    """Row indices (in file order) of train / val / test: by ``split_column`` (train, val or
    validation, test) or seeded ``split`` ratios."""
    if split_column is None:
        return split_rows(len(frame), split, seed)
    require_columns(frame, [split_column], file, "dataset.split_column")
    values = frame[split_column].astype(str).str.lower().replace({"validation": "val", "valid": "val"})
    bad = ~values.isin(SPLITS)
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise ConfigError(
            f"{file}: column {split_column!r} row {row + 1}: {frame[split_column].iloc[row]!r}; allowed: train, val (validation), test"
        )
    return {name: np.flatnonzero((values == name).to_numpy()) for name in SPLITS}


def read_splits(
    path: str | Mapping[str, str], split_column: str | None, split: Sequence[float], seed: int
) -> tuple[dict[str, pd.DataFrame], str]:
    """The train / val / test frames and a name for messages: one file per split, or one
    file split by ``split_column`` or seeded ``split`` ratios."""
    if path is None:
        raise ConfigError("dataset.path is required: a .csv/.parquet file, or {train: ..., val: ..., test: ...}")
    if isinstance(path, Mapping):
        check_split_files(path)
        return {name: read_frame(path[name]) for name in SPLITS}, str(path["train"])
    frame = read_frame(path)
    rows = split_indices(frame, split_column, split, seed, str(path))
    return {name: frame.iloc[index].reset_index(drop=True) for name, index in rows.items()}, str(path)


def check_split_files(path: Mapping[str, str]) -> None:
    if sorted(path) != sorted(SPLITS):
        raise ConfigError(f"dataset.path as a mapping needs exactly the keys train, val, test; got {sorted(path)}")


def require_columns(frame: pd.DataFrame, columns: Sequence[str], file: str, key: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ConfigError(f"{file}: {key} names column {missing[0]!r}, which is not in the file; columns: {', '.join(map(str, frame.columns[:20]))}")


def column_names(source: pa.Table | pd.DataFrame | pq.ParquetFile) -> list[str]:
    """The columns of a read table, a frame, or a Parquet file not read yet."""
    if isinstance(source, pq.ParquetFile):
        return list(source.schema_arrow.names)
    if isinstance(source, pa.Table):
        return list(source.column_names)
    return [str(c) for c in source.columns]


def read_pandas(source: pa.Table | pd.DataFrame | pq.ParquetFile, columns: Sequence[str]) -> pd.DataFrame:
    """``columns`` of the source as a pandas frame (those a table keeps as pandas: targets,
    the split column, categorical inputs)."""
    if isinstance(source, pq.ParquetFile):
        return source.read(columns=list(columns)).to_pandas()
    if isinstance(source, pa.Table):
        return source.select(list(columns)).to_pandas()
    return source[list(columns)]
