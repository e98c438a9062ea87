"""Property: whatever a user types, ``mtl-run``'s preflight answers with exit code 0 or
with one line and exit code 2, never a traceback, and writes nothing.

Command lines are drawn from the config schema itself: the keys of the composed default
config (every section, the method groups' parameters), options of the groups, keys that
do not exist, ``+``/``++``/``~`` forms, and values of every kind (wrong types, numbers out
of range, NaN and infinities, random text, paths with spaces and non-ASCII characters).
The preflight runs in this process, as ``mtl-run`` runs it before Hydra starts.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from omegaconf import DictConfig

from mtl_runner.preflight import override, preflight
from tests.conftest import compose_config, conf_options

#: Group options the preflight may check without the network or big files: backbones
#: with pretrained weights (a download) are left out; disk datasets are drawn, and fail
#: on their missing roots.
GROUPS = {group: conf_options(group) for group in ("balancer", "surgery", "optimizer", "sharing", "dataset")}
GROUPS["backbone"] = ["small_cnn", "mlp", "lenet", "linear", "segnet", "transformer"]


def _leaf_keys(node: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for key, value in node.items_ex(resolve=False):
        path = f"{prefix}{key}"
        nested = isinstance(value, DictConfig) and not value._is_none()
        keys += _leaf_keys(value, f"{path}.") if nested else [path]
    return keys


SCHEMA_KEYS = sorted(k for k in _leaf_keys(compose_config()) if not k.endswith("_target_"))

text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=12)
path = st.lists(st.sampled_from(["runs", "my run", "ü", "a,b", "x=y", "[z]", "'q'", '"d"', "sp ace", "."]),
                min_size=1, max_size=3).map("/".join)
plain_values = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(["true", "false", "null", "[]", "[0.9]", "[1,2,3]", "{a: 1}", "''", "-0.0", "1e400", "nan", "-inf", "abc"]),
)


@st.composite
def overrides(draw: st.DrawFn) -> str:
    form = draw(st.sampled_from(["value", "value", "value", "group", "unknown", "path", "delete"]))
    if form == "group":
        group = draw(st.sampled_from(sorted(GROUPS)))
        option = draw(st.one_of(st.sampled_from(GROUPS[group]), st.from_regex(r"[a-z_]{1,8}", fullmatch=True)))
        return f"{group}={option}"
    key = draw(st.sampled_from(SCHEMA_KEYS))
    if form == "unknown":
        section = key.rpartition(".")[0]
        name = draw(st.from_regex(r"[a-z][a-z_]{0,7}", fullmatch=True))
        return f"{draw(st.sampled_from(['', '+', '++']))}{section + '.' if section else ''}{name}={draw(plain_values)}"
    if form == "delete":
        return f"~{key}"
    if form == "path":
        key = draw(st.sampled_from(["dataset.root", "resume", "init_from", "baseline.root", "hydra.run.dir", key]))
        return override(key, draw(path))
    value = draw(st.one_of(plain_values, text.map(lambda t: override("k", t).split("=", 1)[1])))
    return f"{draw(st.sampled_from(['', '', '+', '++']))}{key}={value}"


@pytest.fixture(scope="module")
def empty_cwd() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="mtl-property-") as folder:
        before = Path.cwd()
        os.chdir(folder)
        try:
            yield Path(folder)
        finally:
            os.chdir(before)


@pytest.mark.slow
# CI draws the same 200 cases every time (a red CI names a change, not a lucky draw);
# locally each run explores new ones. Cases it found once stay as examples.
@settings(
    max_examples=200, deadline=None, derandomize=bool(os.environ.get("CI")),
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(args=st.lists(overrides(), min_size=1, max_size=3))
@example(args=["+affinity=[0.9]"])  # a group given numbers tripped Hydra's defaults tree (TypeError)
def test_any_command_line_exits_0_or_with_one_line(args: list[str], empty_cwd: Path) -> None:
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            preflight(args)
            code = 0
        except SystemExit as exc:
            code = exc.code
    lines = stderr.getvalue().strip().splitlines()
    assert code in (0, 2), (args, stderr.getvalue())
    assert not any("Traceback" in line for line in lines), (args, stderr.getvalue())
    if code == 2:
        assert len(lines) == 1 and lines[0].startswith("mtl-run: error: "), (args, lines)
    assert not any(empty_cwd.iterdir()), (args, list(empty_cwd.iterdir()))
