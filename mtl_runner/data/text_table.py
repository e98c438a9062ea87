"""``dataset=text_table``: a CSV or Parquet table with a text column and one column (or a
list of columns) per sentence-level task.

The table side is :mod:`mtl_runner.data.table`'s: one file or one per split, a split column
or seeded ratios, ``dataset.tasks`` with the kinds classification, binary, multilabel and
regression, missing labels left out of the loss and the metrics. The text is cut into words
(runs of letters and digits, and single punctuation marks) and tokenised as every text
dataset is (:mod:`mtl_runner.data.text`); the heads read the ``[CLS]`` position.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from mtl_runner.data.base import TaskSet
from mtl_runner.data.roots import root_check
from mtl_runner.data.table import encode_targets, parse_tasks
from mtl_runner.data.table_io import SAMPLE_ROWS, SPLITS, read_frame, read_splits, require_columns
from mtl_runner.data.text import WORDS, Example, encode_split, text_taskset, tokenizer_for
from mtl_runner.errors import ConfigError

WORD_PATTERN = re.compile(r"\w+|[^\w\s]")


def words_of(text: object) -> list[str]:
    """An empty cell is an empty text (its labels still count)."""
    return WORD_PATTERN.findall("" if text is None or text != text else str(text))


def _check(
    path: str | Mapping[str, str] | None = None, tasks: Mapping[str, Any] | None = None, text_column: str = "text",
    missing_values: Sequence[Any] = (), max_length: int = 128, truncation: str = "truncate", tokenizer: str = WORDS,
    **_: object,
) -> None:
    """Preflight: the file(s) exist, the text and target columns are there, and the first
    rows pass the target checks (and the length limit, with ``truncation=error``)."""
    if path is None:
        raise ConfigError("dataset.path is required: a .csv/.parquet file, or {train: ..., val: ..., test: ...}")
    specs = parse_tasks(tasks)
    for file in list(path.values()) if isinstance(path, Mapping) else [path]:
        sample = read_frame(file, nrows=SAMPLE_ROWS)
        require_columns(sample, [text_column], str(file), "dataset.text_column")
        for spec in specs:
            if spec.kind != "binary":  # the first rows may hold only one of the two labels
                encode_targets(spec, {"sample": sample}, str(file), missing_values)
        if truncation != "truncate":
            examples = [Example(words_of(t)) for t in sample[text_column]]
            encode_split(examples, tokenizer_for(tokenizer, examples), [], max_length, truncation, f"{file}")


@root_check(_check)
def text_table(
    path: str | Mapping[str, str] | None = None,
    tasks: Mapping[str, Any] | None = None,
    text_column: str = "text",
    split_column: str | None = None,
    split: Sequence[float] = (0.8, 0.1, 0.1),
    missing_values: Sequence[Any] = (),
    seed: int = 0,
    max_length: int = 128,
    truncation: str = "truncate",
    tokenizer: str = WORDS,
) -> TaskSet:
    """The table's texts as token ids, its task columns as targets."""
    specs = parse_tasks(tasks)
    frames, file = read_splits(path, split_column, split, seed)
    for frame in frames.values():
        require_columns(frame, [text_column], file, "dataset.text_column")
    encoded = [encode_targets(spec, frames, file, missing_values) for spec in specs]
    examples = {s: [Example(words_of(t)) for t in frames[s][text_column]] for s in SPLITS}
    targets = {s: {task.name: values[s] for task, values in encoded} for s in SPLITS}
    return text_taskset(
        "text_table", [task for task, _ in encoded], examples, tokenizer_for(tokenizer, examples["train"]),
        max_length, truncation, targets,
    )
