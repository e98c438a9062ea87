"""``dataset=conll``: CoNLL-style column files, each tag column a task.

One token per line, its fields separated by whitespace (or ``separator``), one field per
name in ``columns``; a blank line ends a sentence; ``-DOCSTART-`` lines (CoNLL-2003's
document markers) are skipped. The column named ``word`` holds the tokens; every other
column named in ``tasks`` becomes a task. A tag column listed in ``schemes`` is scored as
chunks with that scheme's tags (chunk F1, :mod:`mtl_runner.spans`); the others by token
accuracy. The three splits are three files under ``root`` (``files``; the CoNLL-2003
convention ``train.txt`` / ``valid.txt`` / ``test.txt`` by default, ``eng.train`` /
``eng.testa`` / ``eng.testb`` in the original release).

Tag inventories come from the training file; a tag seen only in the validation or test
file is an error naming the file and line, as is a line with the wrong number of fields.
The preflight reads the files with the same code, so bad files fail before a run starts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from mtl_runner.data.base import TaskSet
from mtl_runner.data.roots import expand_root, require_files, root_check
from mtl_runner.data.text import WORDS, Example, encode_split, text_taskset, tokenizer_for
from mtl_runner.errors import DatasetRootError
from mtl_runner.spans import check_scheme
from mtl_runner.tasks import Task

WORD_COLUMN = "word"
SPLITS = ("train", "val", "test")
DEFAULT_FILES = {"train": "train.txt", "val": "valid.txt", "test": "test.txt"}
DOCUMENT_MARKER = "-DOCSTART-"
EXPECTED = "one token per line with one field per dataset.columns entry, a blank line between sentences"
OBTAIN = "your corpus in CoNLL column format (e.g. CoNLL-2003: train.txt, valid.txt, test.txt)"


def read_column_file(path: Path, columns: Sequence[str], separator: str | None = None) -> list[dict[str, list[str]]]:
    """Sentences as ``{column: [value per token]}``; a malformed line is a one-line
    :class:`DatasetRootError` naming the file and line."""
    sentences: list[dict[str, list[str]]] = []
    current: dict[str, list[str]] = {c: [] for c in columns}
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            fields = line.rstrip("\n").split(separator) if separator else line.split()
            if not fields or fields == [""]:
                if current[columns[0]]:
                    sentences.append(current)
                    current = {c: [] for c in columns}
                continue
            if fields[0] == DOCUMENT_MARKER:
                continue
            if len(fields) != len(columns):
                raise DatasetRootError(
                    f"{path}:{number}: expected {len(columns)} fields ({' '.join(columns)}), got {len(fields)}: {line.strip()[:60]!r}"
                )
            for column, value in zip(columns, fields):
                current[column].append(value)
    if current[columns[0]]:
        sentences.append(current)
    return sentences


def _check_options(columns: Sequence[str], tasks: Sequence[str], schemes: Mapping[str, str]) -> None:
    if WORD_COLUMN not in columns:
        raise ValueError(f"dataset.columns must name the token column {WORD_COLUMN!r}, got {list(columns)}")
    if len(set(columns)) != len(columns):
        raise ValueError(f"dataset.columns has a repeated name: {list(columns)}")
    tag_columns = [c for c in columns if c != WORD_COLUMN]
    for task in tasks:
        if task not in tag_columns:
            raise ValueError(f"dataset.tasks: {task!r} is not a tag column; allowed: {', '.join(tag_columns)}")
    if not tasks:
        raise ValueError("dataset.tasks must name at least one tag column")
    for column in schemes:  # a scheme describes a column, trained as a task or not
        if column not in tag_columns:
            raise ValueError(f"dataset.schemes: {column!r} is not a tag column; allowed: {', '.join(tag_columns)}")


def _read(root: str, files: Mapping[str, str] | None, columns: Sequence[str], tasks: Sequence[str],
          schemes: Mapping[str, str], separator: str | None) -> tuple[list[Task], dict[str, list[Example]]]:
    """The tasks (tags from the training file, checked against their schemes) and the
    three splits as examples."""
    _check_options(columns, tasks, schemes)
    files = dict(files or DEFAULT_FILES)
    base = expand_root(root)
    missing_split = [s for s in SPLITS if s not in files]
    if missing_split:
        raise ValueError(f"dataset.files needs a file for each of train, val, test; missing {missing_split[0]}")
    require_files(base, [files[s] for s in SPLITS], "CoNLL files", EXPECTED, OBTAIN)
    read = {s: read_column_file(base / files[s], columns, separator) for s in SPLITS}
    if not read["train"]:
        raise DatasetRootError(f"{base / files['train']}: no sentences")
    tasks_out = []
    for name in tasks:
        seen = sorted({tag for sentence in read["train"] for tag in sentence[name]})
        if name in schemes:
            check_scheme(schemes[name], seen, f"dataset.schemes.{name} ({base / files['train']})")
        known = set(seen)
        for split in SPLITS[1:]:
            for sentence in read[split]:
                unseen = [t for t in sentence[name] if t not in known]
                if unseen:
                    raise DatasetRootError(f"{base / files[split]}: {name} tag {unseen[0]!r} never occurs in the training file")
        tasks_out.append(Task(name, "spans" if name in schemes else "tagging", len(seen), class_names=tuple(seen)))
    splits = {
        s: [Example(sentence[WORD_COLUMN], tags={t: sentence[t] for t in tasks}) for sentence in read[s]] for s in SPLITS
    }
    return tasks_out, splits


def _check(root: str, columns: Sequence[str], tasks: Sequence[str], schemes: Mapping[str, str] | None = None,
           files: Mapping[str, str] | None = None, separator: str | None = None, max_length: int = 128,
           truncation: str = "truncate", tokenizer: str = WORDS) -> None:
    """The files read and checked; with ``truncation=error`` every sentence's length too."""
    try:
        task_list, splits = _read(root, files, list(columns), list(tasks), dict(schemes or {}), separator)
        if truncation != "truncate":
            encoder = tokenizer_for(tokenizer, splits["train"])
            for split, examples in splits.items():
                encode_split(examples, encoder, task_list, max_length, truncation, f"dataset=conll {split}")
    except ValueError as exc:
        raise DatasetRootError(str(exc)) from None


@root_check(_check)
def conll(
    root: str,
    columns: Sequence[str] = ("word", "pos", "chunk", "ner"),
    tasks: Sequence[str] = ("pos", "chunk", "ner"),
    schemes: Mapping[str, str] | None = None,
    files: Mapping[str, str] | None = None,
    separator: str | None = None,
    max_length: int = 128,
    truncation: str = "truncate",
    tokenizer: str = WORDS,
) -> TaskSet:
    """Read, check and encode the three files (see the module docstring)."""
    task_list, splits = _read(root, files, list(columns), list(tasks), dict(schemes or {}), separator)
    return text_taskset("conll", task_list, splits, tokenizer_for(tokenizer, splits["train"]), max_length, truncation)
