"""dataset=table's fast in-memory load, its streamed Parquet path, and the fitted input
statistics a resumed run reads back instead of recomputing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mtl_runner.data.summary import FILE_NAME
from mtl_runner.data.table import table
from mtl_runner.data.table_inputs import CHUNK_ROWS
from mtl_runner.data.table_stream import StreamSplit
from mtl_runner.errors import ConfigError
from mtl_runner.runner import run_experiment
from tests.conftest import compose_config

CPU = torch.device("cpu")
TASKS = {"flag": {"kind": "binary"}, "amount": {"kind": "regression"}, "group": {"kind": "classification"}}
#: Far below the test file's size: it streams.
TINY_BUDGET_MB = 0.001


def write_table(path: Path, rows: int = 230, row_group_size: int = 17) -> pd.DataFrame:
    """Numeric inputs of several types (an ``id`` column that identifies each row), a
    categorical one, a split column and three targets, in row groups of ``row_group_size``."""
    rng = np.random.default_rng(1)
    frame = pd.DataFrame({
        "id": np.arange(rows, dtype=np.int64),
        "x": rng.standard_normal(rows).astype(np.float32) * 3 + 100,
        "wide": rng.standard_normal(rows),
        "on": rng.integers(0, 2, rows).astype(bool),
        "colour": rng.choice(["red", "green", "blue"], rows),
        "part": rng.choice(["train", "train", "train", "val", "test"], rows),
    })
    frame["flag"] = (frame["x"] > 100).astype(np.int8)
    frame["amount"] = frame["wide"] * 2.0
    frame["group"] = rng.integers(0, 4, rows)
    frame.to_parquet(path, row_group_size=row_group_size)
    return frame


def ids(x: torch.Tensor, taskset) -> np.ndarray:
    """The ``id`` column of encoded inputs, standardisation undone."""
    stats = taskset.preprocessing["inputs"]["numeric"]["id"]
    return np.rint(x[:, 0].numpy() * stats["std"] + stats["mean"]).astype(np.int64)


@pytest.mark.parametrize("split_column", [None, "part"])
def test_a_streamed_table_splits_encodes_and_batches_as_in_memory(tmp_path: Path, split_column: str | None) -> None:
    path = tmp_path / "t.parquet"
    write_table(path)
    options = {"input_columns": ["id", "x", "wide", "on", "colour"], "categorical_columns": ["colour"],
               "split_column": split_column}
    memory = table(str(path), TASKS, **options)
    streamed = table(str(path), TASKS, memory_budget_mb=TINY_BUDGET_MB, **options)
    assert isinstance(streamed.train, StreamSplit) and not isinstance(memory.train, StreamSplit)
    saved_memory, saved_streamed = memory.preprocessing["inputs"], streamed.preprocessing["inputs"]
    assert saved_streamed["categorical"] == saved_memory["categorical"]
    for column, stats in saved_memory["numeric"].items():
        assert saved_streamed["numeric"][column] == pytest.approx(stats, rel=1e-6), column
    assert streamed.tasks == memory.tasks
    for name in ("train", "val", "test"):
        in_memory, stream = getattr(memory, name), getattr(streamed, name)
        assert len(stream) == len(in_memory)
        for task, target in in_memory.targets.items():
            assert torch.equal(stream.targets[task], target)
        # evaluation order: the file's, as in memory
        x = torch.cat([x for x, _ in stream.batches(50, shuffle=False, generator=None, device=CPU)])
        torch.testing.assert_close(x, in_memory.inputs, rtol=1e-5, atol=1e-5)

    train, batch_size = streamed.train, 16
    epochs = [list(train.batches(batch_size, shuffle=True, generator=torch.Generator().manual_seed(s), device=CPU))
              for s in (0, 0, 1)]
    assert len(epochs[0]) == math.ceil(len(train) / batch_size)
    assert all(len(x) == batch_size for x, _ in epochs[0][:-1])
    seen = np.concatenate([ids(x, streamed) for x, _ in epochs[0]])
    assert sorted(seen.tolist()) == sorted(ids(memory.train.inputs, memory).tolist())  # every training row once
    row_of = dict(zip(ids(memory.train.inputs, memory).tolist(), range(len(memory.train))))
    for x, y in epochs[0]:  # each row's targets travel with its inputs
        at = torch.tensor([row_of[i] for i in ids(x, streamed).tolist()])
        for task, target in y.items():
            torch.testing.assert_close(target, memory.train.targets[task][at], equal_nan=True)
    assert np.array_equal(seen, np.concatenate([ids(x, streamed) for x, _ in epochs[1]]))  # seeded
    assert not np.array_equal(seen, np.concatenate([ids(x, streamed) for x, _ in epochs[2]]))  # shuffled
    assert not np.array_equal(seen, np.sort(seen))
    train.num_workers = 1  # read and encoded in a DataLoader worker: the same batches
    in_worker = list(train.batches(batch_size, shuffle=True, generator=torch.Generator().manual_seed(0), device=CPU))
    assert np.array_equal(seen, np.concatenate([ids(x, streamed) for x, _ in in_worker]))


def test_a_window_smaller_than_the_split_still_mixes_row_groups(tmp_path: Path) -> None:
    """With a shuffle window of about two row groups, rows of a batch come from different
    groups, and the pass still covers every row once."""
    path = tmp_path / "t.parquet"
    write_table(path, rows=400, row_group_size=20)
    streamed = table(str(path), TASKS, input_columns=["id", "x"], memory_budget_mb=40 * 2 * 4 / 0.25 / 2**20)
    assert streamed.train.window_rows < len(streamed.train)
    batches = [ids(x, streamed) for x, _ in streamed.train.batches(8, shuffle=True, generator=torch.Generator(), device=CPU)]
    assert sorted(np.concatenate(batches).tolist()) == sorted(ids(table(str(path), TASKS, input_columns=["id", "x"]).train.inputs, streamed).tolist())
    assert any(len(set((b // 20).tolist())) > 1 for b in batches)


def test_the_in_memory_load_standardises_and_names_bad_rows_by_file_row(tmp_path: Path) -> None:
    frame = write_table(tmp_path / "t.parquet")
    taskset = table(str(tmp_path / "t.parquet"), TASKS, input_columns=["x", "wide", "on"], split_column="part")
    train = taskset.train.inputs
    torch.testing.assert_close(train.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(train.std(0, correction=0), torch.ones(3), atol=1e-5, rtol=0)
    assert train.is_contiguous() and train.dtype == torch.float32
    # the CSV of the same rows gives the same inputs
    frame.to_csv(tmp_path / "t.csv", index=False)
    from_csv = table(str(tmp_path / "t.csv"), TASKS, input_columns=["x", "wide", "on"], split_column="part")
    torch.testing.assert_close(from_csv.test.inputs, taskset.test.inputs)
    bad = frame.copy()
    val_row = int(np.flatnonzero(bad["part"] == "val")[2])
    bad.loc[val_row, "wide"] = np.inf
    bad.to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(ConfigError, match=rf"input column 'wide' row {val_row + 1} \(val\)"):
        table(str(tmp_path / "bad.parquet"), TASKS, input_columns=["x", "wide"], split_column="part")
    with pytest.raises(ConfigError, match=rf"input column 'wide' row {val_row + 1} \(val\)"):
        table(str(tmp_path / "bad.parquet"), TASKS, input_columns=["x", "wide"], split_column="part", memory_budget_mb=TINY_BUDGET_MB)
    with pytest.raises(ConfigError, match="dataset.memory_budget_mb=0: a positive number"):
        table(str(tmp_path / "t.parquet"), TASKS, memory_budget_mb=0)


@pytest.mark.slow
def test_a_resumed_run_standardises_with_its_saved_statistics(tmp_path: Path) -> None:
    """The file changes between the run and its resumption; the resumed run keeps the
    statistics it saved (in data_summary.json), not those the changed data would give."""
    path = tmp_path / "t.parquet"
    frame = write_table(path)
    base = ["dataset=table", f"dataset.path={path}", "dataset.tasks={flag: {kind: binary}, amount: {kind: regression}}",
            "dataset.input_columns=[x, wide]", "backbone=mlp", "backbone.hidden=[8]", "baseline=off",
            "diagnostics=off", "trainer.progress=off", "trainer.batch_size=64", "trainer.device=cpu"]
    run = tmp_path / "run"
    run_experiment(compose_config([*base, "trainer.epochs=1"]), run)
    saved = json.loads((run / FILE_NAME).read_text())["preprocessing"]["inputs"]

    frame["x"] = frame["x"] + 5.0  # the data changed slightly
    frame.to_parquet(path, row_group_size=17)
    refit = table(str(path), TASKS, input_columns=["x", "wide"])
    assert refit.preprocessing["inputs"]["numeric"]["x"]["mean"] == pytest.approx(saved["numeric"]["x"]["mean"] + 5.0, rel=1e-5)

    results = run_experiment(compose_config([*base, "trainer.epochs=2", f"resume={run}"]), run)
    assert results["resumed"] and results["epochs"] == 2
    assert json.loads((run / FILE_NAME).read_text())["preprocessing"]["inputs"] == saved
    reused = table(str(path), TASKS, input_columns=["x", "wide"], statistics=str(run))  # as the resumed run built it
    fitted = refit.preprocessing["inputs"]["numeric"]["x"]
    raw = refit.train.inputs[:, 0] * fitted["std"] + fitted["mean"]
    expected = (raw - saved["numeric"]["x"]["mean"]) / saved["numeric"]["x"]["std"]
    torch.testing.assert_close(reused.train.inputs[:, 0], expected, rtol=1e-4, atol=1e-4)
    assert reused.train.inputs[:, 0].mean().item() == pytest.approx(5.0 / saved["numeric"]["x"]["std"], rel=1e-3)


def test_saved_statistics_must_fit_the_table(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    write_table(path)
    first = table(str(path), TASKS, input_columns=["x", "wide"])
    (tmp_path / FILE_NAME).write_text(json.dumps({"preprocessing": first.preprocessing}))
    again = table(str(path), TASKS, input_columns=["x", "wide"], statistics=str(tmp_path / FILE_NAME))
    assert torch.equal(again.val.inputs, first.val.inputs)
    with pytest.raises(ConfigError, match=r"saved input statistics are for columns \['x', 'wide'\]"):
        table(str(path), TASKS, input_columns=["x"], statistics=str(tmp_path))
    with pytest.raises(ConfigError, match="dataset.statistics=.*no data_summary.json"):
        table(str(path), TASKS, input_columns=["x", "wide"], statistics=str(tmp_path / "elsewhere"))


def test_statistics_match_float64_across_chunks_far_from_zero_and_near_float32_limits(tmp_path: Path) -> None:
    """The in-memory read gathers and sums a few thousand rows at a time in float32: its
    statistics must still be those of the whole training split in float64, for a column
    whose mean is far from its spread, one with nulls (missing: NaN, an error), and one
    whose squares overflow float32."""
    rows = 3 * CHUNK_ROWS + 17  # several chunks, the last one short
    rng = np.random.default_rng(3)
    frame = pd.DataFrame({
        "far": (rng.standard_normal(rows) * 0.01 + 1e4).astype(np.float32),
        "huge": (rng.standard_normal(rows) * 1e20).astype(np.float32),
        "small": rng.integers(0, 5, rows).astype(np.int16),
        "part": rng.choice(["train", "train", "val", "test"], rows),
    })
    frame["flag"] = rng.integers(0, 2, rows)
    frame["amount"] = rng.standard_normal(rows)
    frame["group"] = rng.integers(0, 3, rows)
    frame.to_parquet(tmp_path / "t.parquet", row_group_size=CHUNK_ROWS + 5)  # chunks straddle row groups
    taskset = table(str(tmp_path / "t.parquet"), TASKS, input_columns=["far", "huge", "small"], split_column="part")
    train = frame[frame["part"] == "train"]
    for column, stats in taskset.preprocessing["inputs"]["numeric"].items():
        exact = train[column].to_numpy(np.float64)
        assert stats["mean"] == pytest.approx(exact.mean(), rel=2e-7, abs=1e-4 * exact.std()), column  # saved as float32
        assert stats["std"] == pytest.approx(exact.std(), rel=1e-5), column
    assert taskset.train.inputs.shape == (len(train), 3)
    torch.testing.assert_close(taskset.train.inputs.mean(0), torch.zeros(3), atol=1e-3, rtol=0)

    frame.loc[2 * CHUNK_ROWS + 3, "far"] = np.nan  # a null in a later chunk, in whichever split it falls
    frame.to_parquet(tmp_path / "null.parquet", row_group_size=CHUNK_ROWS + 5)
    split = frame.loc[2 * CHUNK_ROWS + 3, "part"]
    with pytest.raises(ConfigError, match=rf"input column 'far' row {2 * CHUNK_ROWS + 4} \({split}\): nan"):
        table(str(tmp_path / "null.parquet"), TASKS, input_columns=["far", "huge", "small"], split_column="part")
