"""``dataset=table``: a CSV or Parquet table whose target columns are the tasks; and the table
machinery other datasets build on (``image_table``, ``text_table``).

Reusable pieces:

* :mod:`mtl_runner.data.table_io`: :func:`read_frame` reads one file
  (pandas / pyarrow), :func:`read_splits` one file or one per split, split by a
  ``split_column`` (values ``train`` / ``val`` / ``test``) or by seeded ratios
  (:func:`split_rows`);
* :func:`parse_tasks` turns ``dataset.tasks`` into :class:`TaskSpec` s and
  :func:`encode_targets` a spec's column(s) into a :class:`~mtl_runner.tasks.Task` and its
  target tensor, with missing labels (an empty cell, NaN, or one of ``missing_values``) as
  NaN (float kinds) or ``IGNORE_INDEX`` (classification);
* :func:`select_columns` picks the input columns (a list, glob patterns, or every column
  that is neither a target nor the split column) and
  :class:`~mtl_runner.data.table_inputs.InputEncoder` standardises numeric inputs with the
  training split's statistics and one-hot encodes the declared categorical ones
  (categories of the training split; an unseen one is all zeros).

:func:`table` reads the targets, the split column and the categorical inputs with pandas,
and the numeric inputs from pyarrow into one row-major float32 matrix per split
(:mod:`mtl_runner.data.table_inputs`); a Parquet file over ``dataset.memory_budget_mb``
keeps only the former in memory and streams the numeric inputs by row group
(:mod:`mtl_runner.data.table_stream`), with the same split, targets and statistics.

Bad input is one line naming the file, the column (and row, 1-based below the header) and
what is allowed; the preflight runs the same checks on the header and the first rows.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from torch import Tensor

from mtl_runner.data import summary, table_stream
from mtl_runner.data.base import TaskSet, TensorSplit
from mtl_runner.data.roots import root_check
from mtl_runner.data.table_io import (
    SAMPLE_ROWS, SPLITS, check_split_files, column_names, read_columns, read_pandas, read_frame, require_columns, split_indices,
    table_file,
)
from mtl_runner.data.table_inputs import (
    Columns, InputEncoder, category_codes, is_numeric_column, numeric_matrices,
)
from mtl_runner.errors import ConfigError
from mtl_runner.task_targets import UserMetric, build_callable, parse_metrics
from mtl_runner.tasks import AVAILABLE_METRICS, IGNORE_INDEX, Task

KINDS = ("classification", "binary", "multilabel", "regression")


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


def select_columns(columns: Sequence[str], patterns: Sequence[str] | None, exclude: Sequence[str], file: str, key: str) -> list[str]:
    """Columns named by ``patterns`` (names or glob patterns, in the file's order), or every
    column not in ``exclude`` when ``patterns`` is empty."""
    columns = [str(c) for c in columns]
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


@dataclass(frozen=True)
class TableColumns:
    """Which columns of a table play which part."""

    targets: list[str]
    split: list[str]
    numeric: list[str]
    categorical: list[str]

    @classmethod
    def of(cls, names: Sequence[str], specs: Sequence[TaskSpec], input_columns: Sequence[str] | None,
           categorical_columns: Sequence[str], split_column: str | None, file: str) -> TableColumns:
        frame = pd.DataFrame(columns=list(names))
        targets = [c for spec in specs for c in spec.columns]
        split = [split_column] if split_column else []
        require_columns(frame, targets + split, file, "dataset.tasks / dataset.split_column")
        require_columns(frame, [c for c in categorical_columns if "*" not in c], file, "dataset.categorical_columns")
        inputs = select_columns(names, input_columns, targets + split, file, "dataset.input_columns")
        categorical = _matches(inputs, categorical_columns)
        return cls(targets, split, [c for c in inputs if c not in categorical], categorical)

    @property
    def in_memory(self) -> list[str]:
        """The columns read as pandas (a streamed table keeps them in memory)."""
        return list(dict.fromkeys(self.targets + self.split + self.categorical))


def check_numeric(data: Columns, columns: Sequence[str], file: str) -> None:
    for column in columns:
        if not is_numeric_column(data, column):
            kind = data.schema.field(column).type if isinstance(data, pa.Table) else data[column].dtype
            raise ConfigError(
                f"{file}: input column {column!r} is not numeric ({kind}); declare it in "
                "dataset.categorical_columns or leave it out of dataset.input_columns"
            )


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
        columns = TableColumns.of(list(sample.columns), specs, input_columns, categorical_columns, split_column, str(file))
        check_numeric(sample, columns.numeric, str(file))
        numeric_matrices(sample, columns.numeric, {"sample": None}, len(columns.numeric), str(file))  # finite inputs
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
    memory_budget_mb: float = 2048,
    statistics: str | None = None,
) -> TaskSet:
    """Inputs and tasks of one table (or one per split), held in memory as tensors, or
    streamed from a Parquet file whose data exceed ``memory_budget_mb``
    (:mod:`mtl_runner.data.table_stream`). ``statistics``: a run directory (or its
    ``data_summary.json``) whose fitted input statistics are used instead of fitting them
    on this training split (a resumed run reads its own back)."""
    if path is None:
        raise ConfigError("dataset.path is required: a .csv/.parquet file, or {train: ..., val: ..., test: ...}")
    specs = parse_tasks(tasks)
    parquet = None
    if isinstance(path, Mapping):
        check_split_files(path)
        file, where, rows = str(path["train"]), {name: str(path[name]) for name in SPLITS}, dict.fromkeys(SPLITS)
        data: dict[str, Any] = {name: read_columns(path[name]) for name in SPLITS}
        columns = TableColumns.of(column_names(data["train"]), specs, input_columns, categorical_columns, split_column, file)
        for name in ("val", "test"):
            require_columns(pd.DataFrame(columns=column_names(data[name])), columns.targets + columns.numeric + columns.categorical,
                            where[name], "dataset.tasks / dataset.input_columns (as in the training file)")
        small = {name: read_pandas(data[name], columns.in_memory) for name in SPLITS}
    else:
        file, where = str(path), dict.fromkeys(SPLITS, str(path))
        parquet_file = table_file(path)
        parquet = table_stream.open_if_over_budget(parquet_file, memory_budget_mb)
        source = parquet if parquet is not None else read_columns(path)
        data = dict.fromkeys(SPLITS, source)
        columns = TableColumns.of(column_names(source), specs, input_columns, categorical_columns, split_column, file)
        whole = read_pandas(source, columns.in_memory)
        rows = split_indices(whole, split_column, split, seed, file)
        small = {name: whole.iloc[index].reset_index(drop=True) for name, index in rows.items()}
    encoded = [encode_targets(spec, small, file, missing_values) for spec in specs]
    targets = {name: {task.name: split_targets[name] for task, split_targets in encoded} for name in SPLITS}
    for name in SPLITS:
        check_numeric(parquet.schema_arrow.empty_table() if parquet is not None else data[name], columns.numeric, where[name])
    encoder = None
    if statistics is not None:  # fitted by an earlier run
        encoder = InputEncoder.from_state(summary.saved_preprocessing(statistics)["inputs"], columns.numeric, columns.categorical,
                                          f"dataset.statistics={statistics}")
    categories = encoder.categories if encoder is not None else {
        c: sorted(small["train"][c].dropna().astype(str).unique().tolist()) for c in columns.categorical}
    codes = {name: [category_codes(small[name][c], categories[c]) for c in columns.categorical] for name in SPLITS}

    splits: dict[str, Any]
    if parquet is not None:
        if encoder is None:
            encoder = InputEncoder.fit(columns.numeric, table_stream.first_pass(parquet, columns.numeric, rows, file), categories)
        splits = {name: table_stream.StreamSplit(parquet_file, parquet, columns.numeric, rows[name], encoder, codes[name],
                                                 targets[name], memory_budget_mb) for name in SPLITS}
    else:
        width = len(columns.numeric) + sum(len(values) for values in categories.values())
        if isinstance(path, Mapping):
            read = {name: numeric_matrices(data[name], columns.numeric, {name: None}, width, where[name])[name] for name in SPLITS}
        else:
            read = numeric_matrices(data["train"], columns.numeric, rows, width, file)
        if encoder is None:
            encoder = InputEncoder.fit(columns.numeric, read["train"][1], categories)
        splits = {name: TensorSplit(encoder.standardise(read.pop(name)[0], codes[name]), targets[name]) for name in SPLITS}
    return TaskSet(
        "table", tuple(task for task, _ in encoded), splits["train"], splits["val"], splits["test"], (encoder.width,),
        preprocessing={"file": file, "inputs": encoder.state()},
    )
