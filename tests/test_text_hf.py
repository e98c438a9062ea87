"""backbone=hf: a (tiny, locally built) HuggingFace encoder as the shared trunk, tags aligned
to its sub-words, and a model missing from the cache refused in the preflight."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mtl_runner.build import build_model, build_taskset
from mtl_runner.errors import ConfigError
from mtl_runner.preflight import preflight
from mtl_runner.runner import run_experiment
from mtl_runner.tasks import IGNORE_INDEX
from tests.conftest import compose_config

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow  # importing transformers alone takes seconds

WORDS = ["the", "a", "this", "every", "report", "market", "dog", "said", "visited", "in", "near", "to", ",", "."]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-layer BERT with a word-piece vocabulary in which names split into pieces."""
    directory = tmp_path_factory.mktemp("tiny_bert")
    pieces = ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"] + list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *pieces]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = transformers.BertTokenizerFast(vocab_file=str(directory / "vocab.txt"), do_lower_case=False, model_max_length=16)
    tokenizer.save_pretrained(directory)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(directory)
    return directory


def hf_config(model: Path, *extra: str) -> list[str]:
    return ["dataset=tagging_corpus", "backbone=hf", f"backbone.name={model}", "dataset.num_train=48",
            "dataset.num_val=16", "dataset.num_test=16", "trainer.epochs=1", "trainer.batch_size=16",
            "trainer.progress=off", "trainer.num_threads=1", *extra]


def test_tags_sit_on_first_sub_words_and_the_trunk_runs(tiny_model: Path, one_thread: None) -> None:
    cfg = compose_config(hf_config(tiny_model, "baseline=off"))
    taskset = build_taskset(cfg)
    x, y = next(taskset.train.batches(8, shuffle=False, generator=None, device=torch.device("cpu")))
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_model)
    assert (x[:, 0] == tokenizer.cls_token_id).all()
    # every word has exactly one labelled position: its first piece
    for row, ids in enumerate(x.tolist()):
        words = [t for t in tokenizer.convert_ids_to_tokens(ids) if t not in ("[CLS]", "[SEP]", "[PAD]")]
        first_pieces = sum(not t.startswith("##") for t in words)
        assert int((y["pos"][row] != IGNORE_INDEX).sum()) == first_pieces
    out = build_model(cfg, taskset).predict(x)
    assert out["ner"].shape == (*x.shape, taskset.tasks[2].num_outputs)


def test_run_on_the_pretrained_trunk(tiny_model: Path, tmp_path: Path) -> None:
    cfg = compose_config(hf_config(tiny_model, "baseline=off", "surgery=pcgrad", "surgery.space=features"))
    run_experiment(cfg, tmp_path / "run")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "completed" and "f1" in results["tasks"]["ner"]["metrics"]


def test_the_models_position_limit_bounds_the_sentences(tiny_model: Path) -> None:
    """dataset.max_length=64, but the model takes 16 positions: truncated, or refused."""
    taskset = build_taskset(compose_config(hf_config(tiny_model)))
    assert int(taskset.train.lengths.max()) == 16
    with pytest.raises(ConfigError, match="tokens, over the model's limit of 16 positions"):
        build_taskset(compose_config(hf_config(tiny_model, "dataset.truncation=error")))


def test_model_missing_from_the_cache_offline_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    with pytest.raises(SystemExit) as exit_info:
        preflight(["dataset=tagging_corpus", "backbone=hf", "backbone.name=no-such-org/no-such-model"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert "backbone.name=no-such-org/no-such-model: not in the local HuggingFace cache and the machine is offline" in err
    assert not (tmp_path / "outputs").exists()
