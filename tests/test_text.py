"""The text path: the generated tagging corpus, tokenisation and alignment, length buckets,
the Transformer encoder's padding masks, option checks, and a run with baselines and Δm."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mtl_runner.baselines import ensure_baseline, load_baseline_model
from mtl_runner.build import build_model, build_taskset, check_compatible
from mtl_runner.data.tagging_corpus import tagging_corpus
from mtl_runner.data.text import Example, SequenceSplit, WordVocabulary, encode_split
from mtl_runner.errors import ConfigError
from mtl_runner.models.text import TransformerEncoder
from mtl_runner.runner import run_experiment
from mtl_runner.spans import check_scheme
from mtl_runner.tasks import IGNORE_INDEX, Task
from tests.conftest import compose_config

CPU = torch.device("cpu")
#: A run of a second or two: tiny corpus and encoder.
TINY_TEXT = [
    "dataset=tagging_corpus", "backbone=transformer",
    "dataset.num_train=96", "dataset.num_val=32", "dataset.num_test=32",
    "backbone.width=16", "backbone.ffn=32", "backbone.heads=2",
    "trainer.epochs=1", "trainer.batch_size=32", "trainer.progress=off", "baseline=off", "trainer.num_threads=1",
]


def test_corpus_is_seeded_and_its_tags_are_well_formed() -> None:
    a = tagging_corpus(num_train=50, num_val=10, num_test=10, seed=3)
    b = tagging_corpus(num_train=80, num_val=10, num_test=10, seed=3)
    # the training size leaves the test sentences alone (their ids follow the training vocabulary)
    assert all(torch.equal(a.test.targets[t], b.test.targets[t]) for t in ("pos", "chunk", "ner"))
    assert [t.name for t in a.tasks] == ["pos", "chunk", "ner"]
    assert [t.kind for t in a.tasks] == ["tagging", "spans", "spans"]
    for task in a.tasks[1:]:
        check_scheme("bio", task.class_names, task.name)
        # BIO: an I- tag follows a tag of its own type
        tags = a.train.targets[task.name]
        for row in tags.tolist():
            names = [task.class_names[i] for i in row if i != IGNORE_INDEX]
            for prev, tag in zip(["O", *names], names):
                if tag.startswith("I-"):
                    assert prev[2:] == tag[2:], (prev, tag)
    assert {"B-PER", "B-LOC", "B-ORG"} <= set(a.tasks[2].class_names)


def test_word_ids_and_alignment() -> None:
    train = [Example(["the", "dog", "ran"], tags={"pos": ["DT", "NN", "VBD"]}, labels={"tense": "past"})]
    vocab = WordVocabulary(train)
    ids, words = vocab.encode(["the", "cat"])
    assert ids[0] == vocab.cls_id and ids[2] == vocab.unk_id and words == [None, 0, 1]
    tasks = [Task("pos", "tagging", 3, class_names=("DT", "NN", "VBD")), Task("tense", "classification", 2, class_names=("past", "now"))]
    split, truncated = encode_split(train, vocab, tasks, max_length=3, truncation="truncate", where="x")
    assert truncated == 1 and split.tokens.shape == (1, 3)
    assert split.targets["pos"].tolist() == [[IGNORE_INDEX, 0, 1]] and split.targets["tense"].tolist() == [0]
    with pytest.raises(ValueError, match="sentence 1 has 4 tokens, over dataset.max_length=3"):
        encode_split(train, vocab, tasks, max_length=3, truncation="error", where="x")
    with pytest.raises(ValueError, match="dataset.truncation must be one of truncate, error"):
        encode_split(train, vocab, tasks, max_length=3, truncation="drop", where="x")


def test_batches_are_bucketed_by_length_and_cover_every_sentence_once() -> None:
    lengths = torch.arange(1, 201) % 37 + 2
    tokens = (torch.arange(lengths.max()).expand(200, -1) < lengths.unsqueeze(1)).long() * 5
    split = SequenceSplit(tokens, lengths, {"pos": torch.zeros(200, int(lengths.max()), dtype=torch.long)}, pad_id=0)
    order = split.batch_order(10, shuffle=True, generator=torch.Generator().manual_seed(0))
    assert sorted(torch.cat(order).tolist()) == list(range(200))
    padding = sum(int(lengths[i].max() * len(i) - lengths[i].sum()) for i in order)
    assert padding < 0.1 * int(lengths.sum())  # near-equal lengths within a batch
    x, y = next(split.batches(10, shuffle=False, generator=None, device=CPU))
    assert x.shape[1] == int((x != 0).sum(1).max()) and y["pos"].shape == x.shape


def test_encoder_ignores_padding(one_thread: None) -> None:
    """A sentence's representation is the same alone and in a batch padded to a longer one."""
    torch.manual_seed(0)
    encoder = TransformerEncoder((12,), vocab_size=20, width=16, layers=2, heads=2, ffn=32).eval()
    short = torch.tensor([[1, 5, 6, 7]])
    batch = torch.tensor([[1, 5, 6, 7, 0, 0, 0, 0], [1, 8, 9, 10, 11, 12, 13, 14]])
    alone, padded = encoder(short), encoder(batch)
    torch.testing.assert_close(padded[0, :4], alone[0], rtol=1e-5, atol=1e-5)
    assert padded[0, 4:].abs().max() == 0
    heads = {kind: encoder.make_head(Task("t", kind, 3), (12,)) for kind in ("tagging", "classification")}
    assert heads["tagging"](padded).shape == (2, 8, 3) and heads["classification"](padded).shape == (2, 3)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["dataset=tagging_corpus"], "dataset=tagging_corpus gives token ids: use backbone=transformer or backbone=hf"),
        (["backbone=transformer"], "reads token ids: use a text dataset"),
        (["dataset=tagging_corpus", "backbone=transformer", "sharing=mmoe"], "sharing=mmoe does not run on token sequences"),
    ],
)
def test_text_options_must_fit_together(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_compatible(compose_config(overrides))


def test_sharing_strategies_run_on_tokens(one_thread: None) -> None:
    cfg = compose_config([*TINY_TEXT, "dataset.tasks=[pos,ner,tense]"])
    taskset = build_taskset(cfg)
    x, y = next(taskset.train.batches(8, shuffle=False, generator=None, device=CPU))
    for sharing in ("none", "soft", "cross_stitch", "learning_to_branch", "mtan", "film"):
        cfg = compose_config([*TINY_TEXT, f"sharing={sharing}", "dataset.tasks=[pos,ner,tense]"])
        check_compatible(cfg)
        out = build_model(cfg, taskset).predict(x)
        sum(task.loss(out[task.name], y[task.name]) for task in taskset.tasks).backward()
        assert out["tense"].shape == (8, 2) and out["pos"].shape == (*x.shape, taskset.tasks[0].num_outputs), sharing


@pytest.mark.slow
def test_run_with_baselines_and_delta_m_in_the_features_space(tmp_path: Path) -> None:
    cfg = compose_config([
        *TINY_TEXT, "baseline=on", f"baseline.root={tmp_path / 'baselines'}", "surgery=cagrad", "surgery.space=features",
    ])
    run_experiment(cfg, tmp_path / "run")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "completed"
    ner = results["tasks"]["ner"]["metrics"]
    assert set(ner) == {"f1", "precision", "recall"} and 0.0 <= ner["f1"]["mtl"] <= 1.0
    assert ner["f1"]["trivial"] == 0.0  # the most frequent tag is O: no entity found
    assert "stl" in results["tasks"]["pos"]["metrics"]["accuracy"]
    assert isinstance(results["delta_m_pct"], float)
    summary = json.loads((tmp_path / "run" / "data_summary.json").read_text())
    assert summary["tasks"]["pos"]["train"]["coverage"] == 1.0  # padding is not a missing label
    # a cached baseline rebuilds with its vocabulary (what mtl-affinity's CKA measure loads)
    encoder = load_baseline_model(ensure_baseline(cfg, "ner")).encoder
    assert encoder.stages[0].embed.num_embeddings == build_taskset(cfg).vocab_size


@pytest.mark.slow
def test_bench_text_times_uniform_and_each_method() -> None:
    from scripts import bench_text

    lines = bench_text.main(["--rounds", "1", "--steps", "1", "--warmup", "1", "--", *TINY_TEXT[2:]])
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| uniform", "| pcgrad (features)", "| cagrad (features)"]
    assert lines[2].endswith("| 1.00 |")
