"""dataset=conll: reading column files, tasks from tag columns, and bad files refused in the
preflight with one line naming the file and line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from mtl_runner.build import build_taskset
from mtl_runner.data.conll import read_column_file
from mtl_runner.errors import ConfigError
from mtl_runner.preflight import preflight
from mtl_runner.tasks import IGNORE_INDEX
from tests.conftest import compose_config

TRAIN = """-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC
call NN I-NP O
. . O O

Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER
"""
DEV = """Peter NNP B-NP B-PER
rejects VBZ B-VP O
"""


def write_corpus(root: Path, train: str = TRAIN, dev: str = DEV) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "train.txt").write_text(train)
    (root / "valid.txt").write_text(dev)
    (root / "test.txt").write_text(dev)
    return root


def text_config(root: Path, *extra: str) -> list[str]:
    return ["dataset=conll", f"dataset.root={root}", "backbone=transformer", *extra]


def test_reads_sentences_and_tasks(tmp_path: Path) -> None:
    root = write_corpus(tmp_path / "conll")
    sentences = read_column_file(root / "train.txt", ["word", "pos", "chunk", "ner"])
    assert [s["word"] for s in sentences] == [["EU", "rejects", "German", "call", "."], ["Peter", "Blackburn"]]
    taskset = build_taskset(compose_config(text_config(root, "dataset.tasks=[pos,ner]", "dataset.schemes={ner: bio}")))
    pos, ner = taskset.tasks
    assert (pos.kind, ner.kind) == ("tagging", "spans")
    assert ner.class_names == ("B-MISC", "B-ORG", "B-PER", "I-PER", "O")
    x, y = next(taskset.train.batches(2, shuffle=False, generator=None, device=torch.device("cpu")))
    assert x.shape == (2, 6) and y["ner"][0].tolist()[:2] == [IGNORE_INDEX, ner.class_names.index("B-PER")]


@pytest.mark.parametrize(
    ("train", "overrides", "message"),
    [
        (TRAIN.replace("call NN I-NP O", "call NN I-NP"), [], r"train.txt:6: expected 4 fields \(word pos chunk ner\), got 3"),
        (TRAIN, ["dataset.schemes={ner: bilou}"], "unknown tag scheme 'bilou'; allowed: iob1, bio, bioes"),
        (TRAIN.replace("B-PER", "S-PER"), [], "tag 'S-PER' is not a bio tag"),
        (TRAIN, ["dataset.tasks=[pos,srl]"], "dataset.tasks: 'srl' is not a tag column"),
        (TRAIN, ["dataset.max_length=4", "dataset.truncation=error"], "sentence 1 has 6 tokens, over dataset.max_length=4"),
        (TRAIN.replace("B-PER", "B-LOC"), [], "valid.txt: ner tag 'B-PER' never occurs in the training file"),
    ],
)
def test_bad_files_fail_in_the_preflight(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], train: str, overrides: list[str], message: str
) -> None:
    root = write_corpus(tmp_path / "conll", train=train)
    with pytest.raises(SystemExit) as exit_info:
        preflight(text_config(root, *overrides))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert re.search(message, err), err
    assert not (tmp_path / "outputs").exists()


def test_long_sentences_are_truncated_and_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = write_corpus(tmp_path / "conll")
    taskset = build_taskset(compose_config(text_config(root, "dataset.max_length=4")))
    assert taskset.train.tokens.shape[1] == 4
    assert "1 of 2 train sentences were longer than 4 positions (dataset.max_length=4) and were truncated" in caplog.text


def test_missing_files_name_the_root(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="CoNLL files not found"):
        build_taskset(compose_config(text_config(tmp_path / "nowhere")))


def test_four_task_recipe(tmp_path: Path) -> None:
    """experiment=conll_four_tasks reads a fifth column of semantic roles, scored as chunks."""
    with_roles = "\n".join(
        f"{line} {role}" if line and not line.startswith("-DOCSTART-") else line
        for line, role in zip(TRAIN.splitlines(), ["", "", "B-A0", "B-V", "B-A1", "I-A1", "O", "", "B-A0", "I-A0"])
    )
    dev = "Peter NNP B-NP B-PER B-A0\nrejects VBZ B-VP O B-V\n"
    root = write_corpus(tmp_path / "conll", train=with_roles + "\n", dev=dev)
    taskset = build_taskset(compose_config(["experiment=conll_four_tasks", f"dataset.root={root}"]))
    assert [(t.name, t.kind) for t in taskset.tasks] == [("pos", "tagging"), ("chunk", "spans"), ("ner", "spans"), ("srl", "spans")]
