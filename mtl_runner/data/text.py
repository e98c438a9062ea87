"""What every text dataset shares: tokenisation, label alignment, padded batches bucketed by length.

A text example is a list of words with, per token-level task, one tag per word and, per
sentence-level task, one label. A tokenizer turns the words into ids and says which word
each position belongs to; a token-level target carries the word's tag on the word's first
position and :data:`~mtl_runner.tasks.IGNORE_INDEX` elsewhere (special tokens, later
sub-words, padding), so the loss and the metrics see each word once.

Two tokenizers: the word-level :class:`WordVocabulary` built from the training split (for
``backbone=transformer``), position 0 a ``[CLS]`` token whose representation the
sentence-level heads read; or a HuggingFace model's own tokenizer (``backbone=hf``, see
:mod:`mtl_runner.models.text`), loaded from the local cache only.

:class:`SequenceSplit` holds a split as one padded id matrix and yields batches padded to
their own longest sentence; examples are sorted by length within windows of
``BUCKET_BATCHES`` batches (drawn from the run's generator when shuffling), so a batch
holds sentences of similar length and little padding.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from mtl_runner.data.base import Batch, TaskSet
from mtl_runner.errors import ConfigError
from mtl_runner.tasks import IGNORE_INDEX, Task

log = logging.getLogger(__name__)

TRUNCATION = ("truncate", "error")
#: Batches per length-sorted window: enough to find similar lengths, few enough to stay random.
BUCKET_BATCHES = 20
#: ``dataset.tokenizer`` value for the word-level vocabulary of the from-scratch encoder.
WORDS = "words"


@dataclass
class Example:
    """One sentence: its words, a tag per word for each token-level task, a label per
    sentence-level task (class names, or numbers for regression)."""

    words: list[str]
    tags: dict[str, list[str]] = field(default_factory=dict)
    labels: dict[str, str | float] = field(default_factory=dict)


class Tokenizer(Protocol):
    pad_id: int
    vocab_size: int
    #: The most positions the model takes (a pretrained model's position table); None: no limit.
    model_max_length: int | None

    def encode(self, words: Sequence[str]) -> tuple[list[int], list[int | None]]:
        """Ids, and for each position the index of the word it belongs to (None: special)."""
        ...


class WordVocabulary:
    """Ids 0-2 are padding, ``[CLS]`` (position 0 of every sentence) and unknown words (of
    the validation and test splits); then the training split's words, most frequent first
    (ties in alphabetical order, so the ids do not depend on the reading order)."""

    pad_id, cls_id, unk_id = 0, 1, 2
    model_max_length = None  # the sinusoidal position code has no limit

    def __init__(self, training: Sequence[Example]) -> None:
        counts = Counter(w for example in training for w in example.words)
        self.ids = {w: i + 3 for i, w in enumerate(sorted(counts, key=lambda w: (-counts[w], w)))}
        self.vocab_size = len(self.ids) + 3

    def encode(self, words: Sequence[str]) -> tuple[list[int], list[int | None]]:
        ids = [self.cls_id] + [self.ids.get(w, self.unk_id) for w in words]
        return ids, [None, *range(len(words))]


class PretrainedTokenizer:
    """A HuggingFace model's own (fast) tokenizer; the word of each position comes from its
    ``word_ids``, which only fast tokenizers give."""

    def __init__(self, name: str) -> None:
        self.tokenizer = load_pretrained("AutoTokenizer", name)
        if not getattr(self.tokenizer, "is_fast", False):
            raise ConfigError(f"backbone.name={name}: its tokenizer has no fast version, which aligning tags to sub-words needs")
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.vocab_size = len(self.tokenizer)
        # tokenizers without a known limit report a huge sentinel
        self.model_max_length = int(min(self.tokenizer.model_max_length, 1 << 30))

    def encode(self, words: Sequence[str]) -> tuple[list[int], list[int | None]]:
        encoded = self.tokenizer(list(words), is_split_into_words=True, add_special_tokens=True)
        return list(encoded["input_ids"]), list(encoded.word_ids())


def load_pretrained(loader: str, name: str) -> object:
    """``transformers.<loader>.from_pretrained(name)`` from the local cache (or a local
    directory); downloaded only when the machine is not marked offline. A missing
    package or model is one line."""
    try:
        import transformers
    except ImportError:
        raise ConfigError("backbone=hf needs HuggingFace transformers: pip install 'mtl-runner[hf]'") from None
    load = getattr(transformers, loader).from_pretrained
    try:
        return load(name, local_files_only=True)
    except OSError:
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or os.environ.get("TRANSFORMERS_OFFLINE", "0") not in ("", "0"):
            raise ConfigError(
                f"backbone.name={name}: not in the local HuggingFace cache and the machine is offline (HF_HUB_OFFLINE); "
                "download it once where there is network, or give a local model directory"
            ) from None
    try:
        return load(name)
    except OSError as exc:
        raise ConfigError(f"backbone.name={name}: not in the local HuggingFace cache and not downloadable: {str(exc).splitlines()[0]}") from None


def tokenizer_for(name: str, training: Sequence[Example]) -> Tokenizer:
    """``dataset.tokenizer``: ``words`` (the training split's vocabulary) or a model name."""
    return WordVocabulary(training) if name == WORDS else PretrainedTokenizer(name)


class SequenceSplit:
    """A split of ``(N, L_max)`` token ids (``lengths`` the real lengths) and its targets:
    ``(N, L_max)`` tags for the token-level tasks, ``(N,)`` labels for the others."""

    def __init__(self, tokens: Tensor, lengths: Tensor, targets: dict[str, Tensor], pad_id: int) -> None:
        self.tokens, self.lengths, self.targets, self.pad_id = tokens, lengths.cpu(), targets, pad_id

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def nbytes(self) -> int:
        return self.tokens.nbytes + sum(t.nbytes for t in self.targets.values())

    def to(self, device: torch.device) -> SequenceSplit:
        return SequenceSplit(self.tokens.to(device), self.lengths, {k: v.to(device) for k, v in self.targets.items()}, self.pad_id)

    def batch_order(self, batch_size: int, *, shuffle: bool, generator: torch.Generator | None) -> list[Tensor]:
        """Example indices per batch: length-sorted within windows; shuffled windows and
        batch order when training."""
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        window = batch_size * BUCKET_BATCHES
        sorted_windows = [
            chunk[self.lengths[chunk].argsort(stable=True)] for chunk in order.split(window)
        ]
        batches = list(torch.cat(sorted_windows).split(batch_size)) if n else []
        if shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        return batches

    def batches(
        self, batch_size: int, *, shuffle: bool, generator: torch.Generator | None, device: torch.device
    ) -> Iterator[Batch]:
        for index in self.batch_order(batch_size, shuffle=shuffle, generator=generator):
            length = int(self.lengths[index].max())
            on = index.to(self.tokens.device)
            x = self.tokens.index_select(0, on)[:, :length]
            y = {k: (v.index_select(0, on)[:, :length] if v.dim() == 2 else v.index_select(0, on)) for k, v in self.targets.items()}
            yield x.to(device, non_blocking=True), {k: v.to(device, non_blocking=True) for k, v in y.items()}


def encode_split(
    examples: Sequence[Example],
    tokenizer: Tokenizer,
    tasks: Sequence[Task],
    max_length: int,
    truncation: str,
    where: str,
) -> tuple[SequenceSplit, int]:
    """The split as tensors, and how many sentences were cut to ``max_length`` positions.

    Tags and labels are mapped to ids through each task's ``class_names`` (a regression
    task's label is its value); ``truncation=error`` refuses a sentence that is too long
    instead (one line naming ``where`` and the sentence)."""
    if truncation not in TRUNCATION:
        raise ValueError(f"dataset.truncation must be one of {', '.join(TRUNCATION)}, got {truncation!r}")
    if max_length < 2:
        raise ValueError(f"dataset.max_length must be >= 2, got {max_length}")
    limit = max_length if tokenizer.model_max_length is None else min(max_length, tokenizer.model_max_length)
    over = f"dataset.max_length={max_length}" if limit == max_length else f"the model's limit of {limit} positions"
    index = {t.name: {name: i for i, name in enumerate(t.class_names)} for t in tasks}
    rows: list[list[int]] = []
    targets: dict[str, list] = {t.name: [] for t in tasks}
    truncated = 0
    for number, example in enumerate(examples, start=1):
        ids, word_of = tokenizer.encode(example.words)
        if len(ids) > limit:
            if truncation == "error":
                raise ValueError(
                    f"{where}: sentence {number} has {len(ids)} tokens, over {over}; "
                    "shorten it, raise dataset.max_length or set dataset.truncation=truncate"
                )
            truncated += 1
            # keep a closing special token (a model's [SEP]) at the end
            ids, word_of = (ids[: limit - 1] + ids[-1:], word_of[: limit - 1] + word_of[-1:]) if word_of[-1] is None else (ids[:limit], word_of[:limit])
        rows.append(ids)
        for task in tasks:
            if task.is_token_level:
                tags = example.tags[task.name]
                first = [w is not None and (p == 0 or word_of[p - 1] != w) for p, w in enumerate(word_of)]
                targets[task.name].append([index[task.name][tags[w]] if f else IGNORE_INDEX for f, w in zip(first, word_of)])
            elif task.is_regression:
                targets[task.name].append(float(example.labels[task.name]))
            else:
                targets[task.name].append(index[task.name][str(example.labels[task.name])])
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    width = int(lengths.max()) if rows else 1
    tokens = torch.full((len(rows), width), tokenizer.pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    tensors: dict[str, Tensor] = {}
    for task in tasks:
        values = targets[task.name]
        if task.is_token_level:
            padded = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
            for i, v in enumerate(values):
                padded[i, : len(v)] = torch.tensor(v, dtype=torch.long)
            tensors[task.name] = padded
        else:
            tensors[task.name] = torch.tensor(values, dtype=torch.float32 if task.is_regression else torch.long)
    return SequenceSplit(tokens, lengths, tensors, tokenizer.pad_id), truncated


def text_taskset(
    name: str,
    tasks: Sequence[Task],
    splits: Mapping[str, Sequence[Example]],
    tokenizer: Tokenizer,
    max_length: int,
    truncation: str,
    targets: Mapping[str, Mapping[str, Tensor]] | None = None,
) -> TaskSet:
    """The three splits encoded, with a warning counting the sentences cut to ``max_length``.
    ``targets`` (split -> task -> tensor): labels already encoded (a table's columns, with
    their missing labels); the other tasks' labels come from the examples."""
    given = targets or {split: {} for split in splits}
    encoded = {}
    for split, examples in splits.items():
        own = [t for t in tasks if t.name not in given[split]]
        inputs, truncated = encode_split(examples, tokenizer, own, max_length, truncation, f"dataset={name} {split}")
        encoded[split] = SequenceSplit(inputs.tokens, inputs.lengths, {**inputs.targets, **given[split]}, tokenizer.pad_id)
        if truncated:
            limit = min(max_length, tokenizer.model_max_length or max_length)
            log.warning("dataset=%s: %d of %d %s sentences were longer than %d positions (dataset.max_length=%d) and were truncated",
                        name, truncated, len(examples), split, limit, max_length)
    return TaskSet(
        name, tuple(tasks), encoded["train"], encoded["val"], encoded["test"],
        input_shape=(max_length,), vocab_size=tokenizer.vocab_size,
    )
