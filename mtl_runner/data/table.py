"""``dataset=table``: a CSV or Parquet table whose target columns are the tasks; and the table
machinery other datasets build on (``image_table``, ``text_table``).

Reusable pieces, each a function of a pandas ``DataFrame``:

* :func:`read_frame` reads one file (pandas / pyarrow), :func:`read_splits` one file or one
  per split, split by a ``split_column`` (values ``train`` / ``val`` / ``test``) or by seeded
  ratios (:func:`split_rows`);
* :func:`parse_tasks` turns ``dataset.tasks`` into :class:`TaskSpec` s and
  :func:`encode_targets` a spec's column(s) into a :class:`~mtl_runner.tasks.Task` and its
  target tensor, with missing labels (an empty cell, NaN, or one of ``missing_values``) as
  NaN (float kinds) or ``IGNORE_INDEX`` (classification);
* :func:`select_columns` picks the input columns (a list, glob patterns, or every column
  that is neither a target nor the split column) and :class:`InputEncoder` standardises
  numeric inputs with the training split's statistics and one-hot encodes the declared
  categorical ones (categories of the training split; an unseen one is all zeros).

Bad input is one line naming the file, the column (and row, 1-based below the header) and
what is allowed; the preflight runs the same checks on the header and the first rows.

Why this module is long: it is the one home of the table machinery that three datasets
share (``table``, ``image_table``, ``text_table``); split up, each piece's checks and
messages would drift apart.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from mtl_runner.data.base import TaskSet, TensorSplit
from mtl_runner.data.roots import expand_root, root_check
from mtl_runner.errors import ConfigError, DatasetRootError
from mtl_runner.task_targets import UserMetric, build_callable, parse_metrics
from mtl_runner.tasks import AVAILABLE_METRICS, IGNORE_INDEX, Task

SPLITS = ("train", "val", "test")
KINDS = ("classification", "binary", "multilabel", "regression")
#: Rows read by the preflight to check values, not only the header.
SAMPLE_ROWS = 1000


def read_frame(path: str | Path, nrows: int | None = None) -> pd.DataFrame:
    """One ``.csv`` / ``.tsv`` / ``.parquet`` file; ``nrows`` reads only the first rows."""
    file = expand_root(str(path))
    if not file.is_file():
        raise DatasetRootError(f"dataset.path={path}: no such file; expected a .csv, .tsv or .parquet table")
    suffix = file.suffix.lower()
    try:
        if suffix == ".parquet":
            if nrows is None:
                return pd.read_parquet(file)
            import pyarrow.parquet as pq

            first = next(pq.ParquetFile(file).iter_batches(batch_size=nrows), None)
            return first.to_pandas() if first is not None else pd.read_parquet(file)
        if suffix in (".csv", ".tsv"):
            return pd.read_csv(file, sep="\t" if suffix == ".tsv" else ",", nrows=nrows)
    except (ValueError, OSError) as exc:  # pandas / pyarrow parse errors
        raise ConfigError(f"{file}: cannot be read as a {suffix[1:]} table ({str(exc).splitlines()[0]})") from None
    raise ConfigError(f"dataset.path={path}: unknown table format {suffix!r}; allowed: .csv, .tsv, .parquet")


def split_rows(num_rows: int, ratios: Sequence[float], seed: int) -> dict[str, np.ndarray]:
    """Row indices of train / val / test drawn by a seeded permutation in ``ratios``."""
    if len(ratios) != 3 or any(r < 0 for r in ratios) or not math.isclose(sum(ratios), 1.0, abs_tol=1e-6):
        raise ConfigError(f"dataset.split={list(ratios)}: three non-negative fractions (train, val, test) summing to 1")
    order = np.random.default_rng(seed).permutation(num_rows)
    ends = np.round(np.cumsum(ratios) * num_rows).astype(int)
    starts = (0, ends[0], ends[1])
    return {name: np.sort(order[s:e]) for name, s, e in zip(SPLITS, starts, ends)}


def read_splits(
    path: str | Mapping[str, str], split_column: str | None, split: Sequence[float], seed: int
) -> tuple[dict[str, pd.DataFrame], str]:
    """The train / val / test frames and a name for messages: one file per split, or one
    file split by ``split_column`` or seeded ``split`` ratios."""
    if path is None:
        raise ConfigError("dataset.path is required: a .csv/.parquet file, or {train: ..., val: ..., test: ...}")
    if isinstance(path, Mapping):
        if sorted(path) != sorted(SPLITS):
            raise ConfigError(f"dataset.path as a mapping needs exactly the keys train, val, test; got {sorted(path)}")
        return {name: read_frame(path[name]) for name in SPLITS}, str(path["train"])
    frame = read_frame(path)
    if split_column is None:
        return {name: frame.iloc[rows].reset_index(drop=True) for name, rows in split_rows(len(frame), split, seed).items()}, str(path)
    require_columns(frame, [split_column], str(path), "dataset.split_column")
    values = frame[split_column].astype(str).str.lower().replace({"validation": "val", "valid": "val"})
    bad = ~values.isin(SPLITS)
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise ConfigError(
            f"{path}: column {split_column!r} row {row + 1}: {frame[split_column].iloc[row]!r}; allowed: train, val (validation), test"
        )
    return {name: frame[values == name].reset_index(drop=True) for name in SPLITS}, str(path)


def require_columns(frame: pd.DataFrame, columns: Sequence[str], file: str, key: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ConfigError(f"{file}: {key} names column {missing[0]!r}, which is not in the file; columns: {', '.join(map(str, frame.columns[:20]))}")


@dataclass(frozen=True)
class TaskSpec:
    """One entry of ``dataset.tasks``: ``{kind, column | columns, num_classes, metrics, loss}``."""

    name: str
    kind: str
    columns: tuple[str, ...]
    num_classes: int | None = None
    metrics: tuple[str, ...] = ()
    loss: str | Callable[[Tensor, Tensor], Tensor] = "default"
    user_metrics: tuple[UserMetric, ...] = ()

    @property
    def task_arguments(self) -> dict[str, Any]:
        """:class:`~mtl_runner.tasks.Task`'s keywords for metrics and loss (a variant's name or a callable)."""
        loss = {"loss_fn": self.loss} if callable(self.loss) else {"loss_name": self.loss}
        return {"metric_names": self.metrics, "user_metrics": self.user_metrics, **loss}


def parse_tasks(tasks: Mapping[str, Any] | None, kinds: Sequence[str] = KINDS) -> list[TaskSpec]:
    """``dataset.tasks`` (task name -> its settings) as specs; the column defaults to the
    task's name."""
    if not tasks:
        raise ConfigError("dataset.tasks is required: {<name>: {kind: " + "|".join(kinds) + "}, ...}")
    specs, claimed = [], {}
    allowed_keys = {"kind", "column", "columns", "num_classes", "metrics", "loss"}
    for name, settings in tasks.items():
        settings = dict(settings or {})
        unknown = sorted(set(settings) - allowed_keys)
        if unknown:
            raise ConfigError(f"dataset.tasks.{name}.{unknown[0]}: unknown key; allowed: {', '.join(sorted(allowed_keys))}")
        kind = settings.get("kind")
        if kind not in kinds:
            raise ConfigError(f"dataset.tasks.{name}.kind={kind}: allowed: {', '.join(kinds)}")
        columns = settings.get("columns") or [settings.get("column", name)]
        columns = [str(c) for c in ([columns] if isinstance(columns, str) else columns)]
        for column in columns:
            if column in claimed:
                raise ConfigError(f"dataset.tasks.{name}: column {column!r} is already the target of task {claimed[column]!r}; a column is one task's target")
            claimed[column] = name
        if kind in ("binary", "classification") and len(columns) != 1:
            raise ConfigError(f"dataset.tasks.{name}: a {kind} task reads one column, got {columns}")
        metrics, user_metrics = parse_metrics(f"dataset.tasks.{name}.metrics", settings.get("metrics"),
                                              [m.name for m in AVAILABLE_METRICS[kind]])
        loss = settings.get("loss", "default")
        if isinstance(loss, Mapping):
            loss = build_callable(f"dataset.tasks.{name}.loss", loss)
        if not (isinstance(loss, str) or callable(loss)):
            raise ConfigError(f"dataset.tasks.{name}.loss: a loss variant's name or {{_target_: <callable>, ...}}, got {loss!r}")
        specs.append(TaskSpec(str(name), kind, tuple(columns), settings.get("num_classes"), metrics, loss, user_metrics))
    return specs


def _as_missing(values: pd.Series, missing_values: Sequence[Any]) -> pd.Series:
    return values.mask(values.isin(list(missing_values))) if missing_values else values


def _first_row(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0]) + 1


def encode_targets(
    spec: TaskSpec, frames: Mapping[str, pd.DataFrame], file: str, missing_values: Sequence[Any] = ()
) -> tuple[Task, dict[str, Tensor]]:
    """The task and its target tensor per split. Class labels: integers ``0..K-1`` (``K`` is
    ``num_classes``, or the largest label + 1), or any other values, whose sorted distinct
    values become the classes; binary labels: 0/1, booleans, or two distinct values."""
    for frame in frames.values():
        require_columns(frame, list(spec.columns), file, f"dataset.tasks.{spec.name}")
    raw = {s: [_as_missing(f[c], missing_values) for c in spec.columns] for s, f in frames.items()}
    where = f"{file}: column {spec.columns[0]!r}"
    if spec.kind in ("regression",):
        targets = {}
        for s, cols in raw.items():
            numeric = [pd.to_numeric(c, errors="coerce") for c in cols]
            for col, num in zip(cols, numeric):
                bad = (num.isna() & col.notna()).to_numpy() | np.isinf(num.to_numpy(dtype=float))
                if bad.any():
                    r = _first_row(bad)
                    raise ConfigError(f"{file}: column {col.name!r} row {r} ({s}): {col.iloc[r - 1]!r}; a regression target must be a finite number or empty")
            values = np.stack([n.to_numpy(dtype=np.float32) for n in numeric], axis=1)
            targets[s] = torch.from_numpy(values[:, 0] if values.shape[1] == 1 else values)
        task = Task(spec.name, "regression", len(spec.columns), **spec.task_arguments)
        return task, targets
    if spec.kind == "multilabel":
        targets = {}
        for s, cols in raw.items():
            values = np.stack([pd.to_numeric(c, errors="coerce").to_numpy(dtype=np.float32) for c in cols], axis=1)
            bad = ~np.isnan(values) & (values != 0) & (values != 1)
            bad |= np.stack([(pd.to_numeric(c, errors="coerce").isna() & c.notna()).to_numpy() for c in cols], axis=1)
            if bad.any():
                r, j = np.argwhere(bad)[0]
                raise ConfigError(f"{file}: column {spec.columns[j]!r} row {r + 1} ({s}): {raw[s][j].iloc[r]!r}; a multilabel column holds 0, 1 or nothing")
            targets[s] = torch.from_numpy(values)
        return Task(spec.name, "multilabel", len(spec.columns), class_names=spec.columns, **spec.task_arguments), targets
    # classification and binary: one column of labels
    series = {s: cols[0] for s, cols in raw.items()}
    present = pd.concat([v.dropna() for v in series.values()])
    distinct = sorted(present.unique().tolist(), key=lambda v: (str(type(v)), v))
    numeric = pd.api.types.is_numeric_dtype(present) and all(float(v).is_integer() for v in distinct)
    if spec.kind == "binary":
        if len(distinct) != 2:
            raise ConfigError(f"{where}: a binary task needs exactly two distinct labels, found {len(distinct)} ({distinct[:5]})")
        codes = {v: float(i) for i, v in enumerate(distinct)}
        targets = {s: torch.tensor(v.map(codes).to_numpy(dtype=np.float32, na_value=np.nan)) for s, v in series.items()}
        return Task(spec.name, "binary", 1, class_names=tuple(map(str, distinct)), **spec.task_arguments), targets
    if len(distinct) < 2:
        raise ConfigError(f"{where}: a classification task needs at least two classes, found {len(distinct)} ({distinct})")
    if numeric:
        num_classes = int(spec.num_classes or max(distinct) + 1)
        for s, v in series.items():
            labels = v.to_numpy(dtype=float, na_value=np.nan)
            bad = ~np.isnan(labels) & ((labels < 0) | (labels >= num_classes))
            if bad.any():
                r = _first_row(bad)
                raise ConfigError(f"{where} row {r} ({s}): class label {labels[r - 1]:g} out of range; allowed: 0..{num_classes - 1} (dataset.tasks.{spec.name}.num_classes={num_classes})")
        names = tuple(str(i) for i in range(num_classes))
        targets = {s: torch.from_numpy(np.nan_to_num(v.to_numpy(dtype=float, na_value=np.nan), nan=IGNORE_INDEX).astype(np.int64)) for s, v in series.items()}
    else:
        names = tuple(map(str, distinct))
        codes = {v: i for i, v in enumerate(distinct)}
        targets = {s: torch.tensor(v.map(codes).fillna(IGNORE_INDEX).to_numpy(dtype=np.int64)) for s, v in series.items()}
    return Task(spec.name, "classification", len(names), class_names=names, **spec.task_arguments), targets


def _matches(columns: Sequence[str], patterns: Sequence[str]) -> list[str]:
    return [c for c in columns if any(fnmatch.fnmatchcase(c, p) for p in patterns)]


def select_columns(frame: pd.DataFrame, patterns: Sequence[str] | None, exclude: Sequence[str], file: str, key: str) -> list[str]:
    """Columns named by ``patterns`` (names or glob patterns, in the file's order), or every
    column not in ``exclude`` when ``patterns`` is empty."""
    columns = [str(c) for c in frame.columns]
    if not patterns:
        return [c for c in columns if c not in exclude]
    chosen = _matches(columns, patterns)
    for pattern in patterns:
        if not _matches(columns, [pattern]):
            raise ConfigError(f"{file}: {key} entry {pattern!r} matches no column; columns: {', '.join(columns[:20])}")
    clash = [c for c in chosen if c in exclude]
    if clash:
        raise ConfigError(f"{file}: column {clash[0]!r} is both an input ({key}) and a target or the split column")
    return chosen


class InputEncoder:
    """Inputs as one float32 matrix: numeric columns standardised with the training split's
    mean and standard deviation (a constant column is only centred), categorical columns
    one-hot over the training split's categories. :meth:`state` is what the run directory
    keeps (``data_summary.json``)."""

    def __init__(self, train: pd.DataFrame, columns: Sequence[str], categorical: Sequence[str], file: str) -> None:
        self.file = file
        self.categorical = [c for c in columns if c in set(categorical)]
        self.numeric = [c for c in columns if c not in set(categorical)]
        for column in self.numeric:
            if not pd.api.types.is_numeric_dtype(train[column]) and not pd.api.types.is_bool_dtype(train[column]):
                raise ConfigError(
                    f"{file}: input column {column!r} is not numeric ({train[column].dtype}); declare it in "
                    "dataset.categorical_columns or leave it out of dataset.input_columns"
                )
        values = self._numeric_values(train, "train")
        if len(values):
            variance, mean = torch.var_mean(values, dim=0, correction=0)
        else:
            variance, mean = torch.ones(len(self.numeric)), torch.zeros(len(self.numeric))
        self.mean = mean
        self.std = torch.where(variance > 0, variance.sqrt(), 1.0)
        self.categories = {c: sorted(train[c].dropna().astype(str).unique().tolist()) for c in self.categorical}

    @property
    def width(self) -> int:
        return len(self.numeric) + sum(len(v) for v in self.categories.values())

    def _numeric_values(self, frame: pd.DataFrame, split: str) -> Tensor:
        """The numeric inputs as one float32 tensor (a copy: it is standardised in place)."""
        if not self.numeric:
            return torch.zeros(len(frame), 0)
        values = torch.from_numpy(frame[self.numeric].to_numpy(dtype=np.float32, na_value=np.nan, copy=True))
        # one reduction instead of an element-wise mask: float32 values summed in float64 cannot
        # overflow, so a column's sum is non-finite exactly when it holds a NaN or an infinity
        if not bool(torch.isfinite(values.sum(0, dtype=torch.float64)).all()):
            r, j = (int(i) for i in torch.nonzero(~torch.isfinite(values))[0])
            raise ConfigError(f"{self.file}: input column {self.numeric[j]!r} row {r + 1} ({split}): {float(values[r, j])}; inputs must be finite numbers (drop or impute the row)")
        return values

    def transform(self, frame: pd.DataFrame, split: str) -> Tensor:
        parts = [self._numeric_values(frame, split).sub_(self.mean).div_(self.std)]
        for column, categories in self.categories.items():
            values = frame[column].astype(str)
            codes = torch.from_numpy(pd.Categorical(values.where(values.isin(categories)), categories=categories).codes.astype(np.int64))
            one_hot = torch.nn.functional.one_hot(codes.clamp_min(0), len(categories)).float() * (codes >= 0).unsqueeze(1)
            parts.append(one_hot)
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def state(self) -> dict[str, Any]:
        return {
            "numeric": {c: {"mean": m, "std": s} for c, m, s in zip(self.numeric, self.mean.tolist(), self.std.tolist())},
            "categorical": self.categories,
        }


def check_table(
    path: str | Mapping[str, str] | None = None, tasks: Mapping[str, Any] | None = None,
    input_columns: Sequence[str] | None = None, categorical_columns: Sequence[str] = (),
    split_column: str | None = None, missing_values: Sequence[Any] = (), **_: object,
) -> None:
    """Preflight: the file(s) exist, the declared columns are there, and the first
    :data:`SAMPLE_ROWS` rows pass the input and target checks."""
    if path is None:
        raise ConfigError("dataset.path is required: a .csv/.parquet file, or {train: ..., val: ..., test: ...}")
    specs = parse_tasks(tasks)
    files = list(path.values()) if isinstance(path, Mapping) else [path]
    for file in files:
        sample = read_frame(file, nrows=SAMPLE_ROWS)
        targets = [c for spec in specs for c in spec.columns]
        exclude = targets + ([split_column] if split_column else [])
        require_columns(sample, exclude, str(file), "dataset.tasks / dataset.split_column")
        columns = select_columns(sample, input_columns, exclude, str(file), "dataset.input_columns")
        require_columns(sample, [c for c in categorical_columns if "*" not in c], str(file), "dataset.categorical_columns")
        InputEncoder(sample, columns, _matches(columns, categorical_columns), str(file))
        for spec in specs:
            if spec.kind != "binary":  # the first rows may hold only one of the two labels
                encode_targets(spec, {"sample": sample}, str(file), missing_values)


@root_check(check_table)
def table(
    path: str | Mapping[str, str] | None = None,
    tasks: Mapping[str, Any] | None = None,
    input_columns: Sequence[str] | None = None,
    categorical_columns: Sequence[str] = (),
    split_column: str | None = None,
    split: Sequence[float] = (0.8, 0.1, 0.1),
    missing_values: Sequence[Any] = (),
    seed: int = 0,
) -> TaskSet:
    """Inputs and tasks of one table (or one per split), held in memory as tensors."""
    specs = parse_tasks(tasks)
    frames, file = read_splits(path, split_column, split, seed)
    encoded = [encode_targets(spec, frames, file, missing_values) for spec in specs]
    exclude = [c for spec in specs for c in spec.columns] + ([split_column] if split_column else [])
    columns = select_columns(frames["train"], input_columns, exclude, file, "dataset.input_columns")
    encoder = InputEncoder(frames["train"], columns, _matches(columns, categorical_columns), file)
    splits = {
        name: TensorSplit(encoder.transform(frames[name], name), {task.name: targets[name] for task, targets in encoded})
        for name in SPLITS
    }
    return TaskSet(
        "table", tuple(task for task, _ in encoded), splits["train"], splits["val"], splits["test"], (encoder.width,),
        preprocessing={"file": file, "inputs": encoder.state()},
    )
