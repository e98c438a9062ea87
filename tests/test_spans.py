"""Chunk F1 (mtl_runner/spans.py) against hand counts on constructed sentences, and against a
token-by-token reading of the CoNLL script's state machine on random tag sequences."""

from __future__ import annotations

import random

import pytest
import torch

from mtl_runner.spans import ChunkCounter, check_scheme, parse_tag
from mtl_runner.tasks import IGNORE_INDEX, Task

TAGS = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC", "E-PER", "S-PER", "E-LOC", "S-LOC")


def counts(gold: list[list[str]], pred: list[list[str]]) -> list[int]:
    """[correct, predicted, gold] over sentences of equal lengths (padded with IGNORE)."""
    length = max(len(s) for s in gold)
    ids = {t: i for i, t in enumerate(TAGS)}
    target = torch.full((len(gold), length), IGNORE_INDEX)
    guess = torch.zeros((len(gold), length), dtype=torch.long)
    for row, (g, p) in enumerate(zip(gold, pred)):
        target[row, : len(g)] = torch.tensor([ids[t] for t in g])
        guess[row, : len(p)] = torch.tensor([ids[t] for t in p])
    counter = ChunkCounter(TAGS, torch.device("cpu"))
    counter.update(guess, target, target != IGNORE_INDEX)
    return counter.counts.tolist()


@pytest.mark.parametrize(
    ("gold", "pred", "expected"),
    [
        # exact match of two entities
        (["B-PER", "I-PER", "O", "B-LOC"], ["B-PER", "I-PER", "O", "B-LOC"], [2, 2, 2]),
        # partial span: the prediction stops one token early, and one starts late
        (["B-PER", "I-PER", "I-PER", "O"], ["B-PER", "I-PER", "O", "O"], [0, 1, 1]),
        (["O", "B-LOC", "I-LOC", "O"], ["O", "O", "B-LOC", "O"], [0, 1, 1]),
        # the right boundaries, the wrong type
        (["B-PER", "I-PER", "O"], ["B-LOC", "I-LOC", "O"], [0, 1, 1]),
        # a type change inside a span splits the prediction into two chunks
        (["B-PER", "I-PER", "I-PER"], ["B-PER", "I-PER", "I-LOC"], [0, 2, 1]),
        # I- after O opens a chunk (IOB1 and ill-formed BIO are scored, not rejected)
        (["O", "I-PER", "I-PER"], ["O", "B-PER", "I-PER"], [1, 1, 1]),
        # B- right after I- of the same type: two adjacent chunks (IOB1's reason for B-)
        (["I-PER", "I-PER", "B-PER"], ["I-PER", "I-PER", "I-PER"], [0, 1, 2]),
        # BIOES: S- is a chunk of one token; E- closes
        (["S-PER", "S-PER", "B-LOC", "E-LOC"], ["S-PER", "B-PER", "E-PER", "E-LOC"], [1, 3, 3]),
        # nothing predicted, nothing to find
        (["O", "O"], ["O", "O"], [0, 0, 0]),
    ],
)
def test_hand_counts(gold: list[str], pred: list[str], expected: list[int]) -> None:
    assert counts([gold], [pred]) == expected


def test_skipped_positions_neither_count_nor_break_a_chunk() -> None:
    """A sub-word (IGNORE) inside an entity is skipped; padding after a sentence closes it."""
    ids = {t: i for i, t in enumerate(TAGS)}
    target = torch.tensor([[ids["B-PER"], IGNORE_INDEX, ids["I-PER"], IGNORE_INDEX]])
    pred = torch.tensor([[ids["B-PER"], ids["O"], ids["I-PER"], ids["I-PER"]]])
    counter = ChunkCounter(TAGS, torch.device("cpu"))
    counter.update(pred, target, target != IGNORE_INDEX)
    assert counter.counts.tolist() == [1, 1, 1]


def test_f1_over_sentences_and_the_task_metric() -> None:
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-LOC", "O"]]
    pred = [["B-PER", "I-PER", "O", "O"], ["B-PER", "O"]]
    assert counts(gold, pred) == [1, 2, 3]
    task = Task("ner", "spans", len(TAGS), class_names=TAGS)
    acc = task.accumulator(torch.device("cpu"))
    ids = {t: i for i, t in enumerate(TAGS)}
    target = torch.tensor([[ids[t] for t in gold[0]], [ids[t] for t in gold[1]] + [IGNORE_INDEX] * 2])
    scores = torch.nn.functional.one_hot(torch.tensor([[ids[t] for t in pred[0]], [ids[t] for t in pred[1]] + [0, 0]]), len(TAGS)).float()
    acc.update(scores, target)
    precision, recall = 1 / 2, 1 / 3
    assert acc.compute() == pytest.approx({"f1": 2 * precision * recall / (precision + recall), "precision": precision, "recall": recall})
    loss = task.loss(scores * 10, target)
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_scheme_checks() -> None:
    assert parse_tag("B-PER") == ("B", "PER") and parse_tag("O") == ("O", "")
    check_scheme("bioes", ["O", "S-LOC", "E-LOC"], "ner")
    with pytest.raises(ValueError, match="unknown tag scheme 'bilou'"):
        check_scheme("bilou", ["O"], "ner")
    with pytest.raises(ValueError, match="'S-LOC' is not a bio tag"):
        check_scheme("bio", ["O", "S-LOC"], "ner")
    with pytest.raises(ValueError, match="neither O nor"):
        check_scheme("bio", ["PER"], "ner")


def script_counts(gold: list[str], pred: list[str]) -> list[int]:
    """The CoNLL script's token-by-token reading (with the BIOES additions of
    mtl_runner/spans.py): a chunk is correct when both sequences open it on the same token
    with the same type and close it on the same token, without either closing in between."""

    def split(tag: str) -> tuple[str, str]:
        return ("O", "") if tag == "O" else (tag[0], tag[2:])

    def opens(prev: str, tag: str) -> bool:
        (pp, pt), (p, t) = split(prev), split(tag)
        return p != "O" and (p in "BS" or pp in "OES" or pt != t)

    def closes(tag: str, nxt: str) -> bool:
        (p, t), (np_, nt) = split(tag), split(nxt)
        return p != "O" and (p in "ES" or np_ in "OBS" or nt != t)

    correct = found_pred = found_gold = 0
    in_correct = False
    gold, pred = ["O", *gold, "O"], ["O", *pred, "O"]
    for i in range(1, len(gold) - 1):
        g_open, p_open = opens(gold[i - 1], gold[i]), opens(pred[i - 1], pred[i])
        g_close, p_close = closes(gold[i], gold[i + 1]), closes(pred[i], pred[i + 1])
        same_type = split(gold[i])[1] == split(pred[i])[1]
        if g_open and p_open and same_type:
            in_correct = True
        elif g_open != p_open or (g_open and not same_type):
            in_correct = False
        if in_correct and g_close and p_close and same_type:
            correct += 1
            in_correct = False
        elif g_close != p_close:
            in_correct = False
        found_gold += g_open
        found_pred += p_open
    return [correct, found_pred, found_gold]


def test_vectorised_counts_follow_the_script() -> None:
    """300 random sentences, scored one by one and all together (padded to one batch)."""
    rng = random.Random(0)
    golds, preds = [], []
    for _ in range(300):
        length = rng.randint(1, 12)
        # Mostly well-formed runs, so that many chunks are long and many are correct.
        gold = [rng.choice(TAGS) for _ in range(length)]
        pred = [g if rng.random() < 0.7 else rng.choice(TAGS) for g in gold]
        assert counts([gold], [pred]) == script_counts(gold, pred), (gold, pred)
        golds.append(gold)
        preds.append(pred)
    totals = [sum(c) for c in zip(*(script_counts(g, p) for g, p in zip(golds, preds)))]
    assert counts(golds, preds) == totals
