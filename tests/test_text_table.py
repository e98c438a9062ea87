"""dataset=text_table: texts in a table column, sentence-level tasks from the other columns
(the table machinery's kinds and missing labels), trained on the [CLS] position."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mtl_runner.build import build_taskset
from mtl_runner.preflight import preflight
from mtl_runner.runner import run_experiment
from mtl_runner.tasks import IGNORE_INDEX
from tests.conftest import compose_config

TASKS = "dataset.tasks={sentiment: {kind: classification}, topic: {kind: multilabel, columns: [sport, money]}}"


def write_reviews(path: Path, rows: int = 60) -> Path:
    lines = ["text,sentiment,sport,money"]
    for i in range(rows):
        good = i % 2 == 0
        sport = i % 3 == 0
        text = f"{'great' if good else 'awful'} {'match' if sport else 'film'}, {'cheap' if i % 5 == 0 else 'long'} day {i}"
        sentiment = "" if i == 7 else ("pos" if good else "neg")  # row 8: no sentiment label
        lines.append(f'"{text}",{sentiment},{int(sport)},{int(i % 5 == 0)}')
    path.write_text("\n".join(lines) + "\n")
    return path


def test_texts_and_table_targets(tmp_path: Path) -> None:
    csv = write_reviews(tmp_path / "reviews.csv")
    taskset = build_taskset(compose_config(["dataset=text_table", f"dataset.path={csv}", TASKS, "backbone=transformer"]))
    sentiment, topic = taskset.tasks
    assert (sentiment.kind, sentiment.class_names, topic.kind, topic.num_outputs) == ("classification", ("neg", "pos"), "multilabel", 2)
    every = [taskset.train, taskset.val, taskset.test]
    assert sum(len(s) for s in every) == 60
    assert sum(int((s.targets["sentiment"] == IGNORE_INDEX).sum()) for s in every) == 1
    assert int(taskset.train.lengths.max()) == 7  # [CLS] great match , cheap day 12: words and punctuation


@pytest.mark.slow
def test_run_on_a_text_table(tmp_path: Path) -> None:
    csv = write_reviews(tmp_path / "reviews.csv")
    cfg = compose_config([
        "dataset=text_table", f"dataset.path={csv}", TASKS, "backbone=transformer", "backbone.width=16", "backbone.ffn=16",
        "backbone.heads=2", "trainer.epochs=2", "trainer.batch_size=16", "trainer.progress=off", "trainer.num_threads=1", "baseline=off",
    ])
    run_experiment(cfg, tmp_path / "run")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "completed" and set(results["tasks"]) == {"sentiment", "topic"}


def test_missing_text_column_fails_in_the_preflight(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv = write_reviews(tmp_path / "reviews.csv")
    with pytest.raises(SystemExit) as exit_info:
        preflight(["dataset=text_table", f"dataset.path={csv}", TASKS, "backbone=transformer", "dataset.text_column=review"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert re.search(r"reviews.csv: dataset.text_column names column 'review', which is not in the file", err), err
