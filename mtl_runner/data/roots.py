"""Datasets read from disk: where their files are, and a check that runs before anything.

A dataset callable read from ``dataset.root`` carries a side-effect-free check,
attached with :func:`root_check`. ``mtl-run`` calls it through :func:`check_dataset` in
its preflight, after the config validated and before Hydra creates a run directory, so a
missing or incomplete root fails in a second with one line naming the path, the files
expected and where to get them, and nothing is written. Backbones with pretrained
weights use the same hook (:mod:`mtl_runner.models.resnets`): the weights are fetched
into the torch hub cache, or the run stops, before anything is written. The dataset callable runs the
same check first when it builds (a Python caller gets the same message).

A user's own dataset opts in the same way::

    def check(root: str, **_: object) -> None: ...   # raise DatasetRootError

    @root_check(check)
    def my_dataset(root: str, ...) -> TaskSet: ...
"""

from __future__ import annotations

import inspect
import os
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf

from mtl_runner.errors import DatasetRootError, locate

F = TypeVar("F", bound=Callable[..., Any])


def expand_root(root: str) -> Path:
    """``dataset.root`` with ``~`` and environment variables expanded."""
    return Path(os.path.expandvars(os.path.expanduser(str(root))))


def root_error(root: str | Path, name: str, problem: str, expected: str, obtain: str) -> DatasetRootError:
    """The one-line error: path, what is wrong, the layout expected, where to get it."""
    message = f"dataset.root={root}: {name} {problem}; expected {expected}; get it from {obtain}"
    return DatasetRootError(" ".join(message.split()))


def require_files(root: Path, relative: Iterable[str], name: str, expected: str, obtain: str) -> None:
    """Raise :class:`DatasetRootError` naming the first of ``relative`` missing under ``root``."""
    if root.exists() and not root.is_dir():
        raise root_error(root, name, "is a file, not a directory", expected, obtain)
    if not root.is_dir():
        raise root_error(root, name, "not found (no such directory)", expected, obtain)
    if not os.access(root, os.R_OK | os.X_OK):
        raise root_error(root, name, "cannot be read (permission denied)", expected, obtain)
    missing = [rel for rel in relative if not (root / rel).exists()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise root_error(root, name, f"is incomplete: missing {missing[0]}{more}", expected, obtain)


@contextmanager
def reading(path: Path, advice: str) -> Iterator[None]:
    """Errors while reading one of a dataset's files (unreadable, truncated, not the
    compression it claims) become a :class:`DatasetRootError` naming the file;
    ``advice``: what to do, e.g. "re-download MNIST"."""
    try:
        yield
    except DatasetRootError:
        raise
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetRootError(f"{path}: cannot be read ({_reason(exc)}); {advice}") from None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, EOFError):
        return "truncated: it ends before its data does"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc).splitlines()[0].lower() if str(exc) else type(exc).__name__


def root_check(check: Callable[..., None]) -> Callable[[F], F]:
    """Attach ``check`` (same keyword arguments as the dataset; raises
    :class:`DatasetRootError`) to a dataset callable as its preflight check."""

    def attach(fn: F) -> F:
        fn.check_root = check  # type: ignore[attr-defined]
        return fn

    return attach


def check_dataset(node: DictConfig | dict[str, Any]) -> None:
    """Run the preflight check of a config node's target (``dataset``, or ``backbone``
    for its weights), if it has one.

    Only keys the check accepts are passed (all of them when it takes ``**kwargs``).
    Raises :class:`DatasetRootError` (or ``ValueError`` for a bad value)."""
    target_name = node["_target_"]
    try:
        target = locate(str(target_name))
    except Exception:  # validate() reports an unimportable target
        return
    check = getattr(target, "check_root", None)
    if check is None:
        return
    values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    assert isinstance(values, dict)
    kwargs = {str(k): v for k, v in values.items() if not (str(k).startswith("_") and str(k).endswith("_"))}
    params = inspect.signature(check).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in params}
    # a check that stumbles over a file (permissions, a corrupt archive) still says which
    with reading(Path(str(kwargs.get("root", "."))), f"check {node.get('_target_')}'s files"):
        check(**kwargs)
