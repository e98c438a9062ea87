"""Where a run keeps its checkpoint, and reading checkpoints back.

A run directory of ``mtl-run`` holds its latest state in ``checkpoints/last.pt``; the
preflight (``resume=``), the config validation (``init_from=``), the runner, the trainer
and the baseline cache all find it through :func:`last_checkpoint`, so the layout is
written down once. Writing goes through :func:`mtl_runner.io.torch_save` (atomic).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mtl_runner.errors import ConfigError

__all__ = ["LAST_NAME", "checkpoint_dir", "last_checkpoint", "checkpoint_file", "load", "read_model_state"]

#: File name of the latest checkpoint inside :func:`checkpoint_dir`.
LAST_NAME = "last.pt"


def checkpoint_dir(run_dir: str | Path) -> Path:
    """The directory of a run's checkpoints."""
    return Path(run_dir) / "checkpoints"


def last_checkpoint(run_dir: str | Path) -> Path:
    """The latest checkpoint of a run directory (it may not exist yet)."""
    return checkpoint_dir(run_dir) / LAST_NAME


def checkpoint_file(init_from: str) -> Path | None:
    """The ``.pt`` file ``init_from`` names: the file itself, or a run directory's
    latest checkpoint; ``None`` when there is none."""
    path = Path(init_from).expanduser()
    if path.is_dir():
        path = last_checkpoint(path)
    return path if path.is_file() else None


def load(path: Path, key: str, weights_only: bool) -> Any:
    """A checkpoint read onto the CPU; one that cannot be read is a :class:`ConfigError`
    naming ``key`` (the setting that pointed at it), not a traceback."""
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as exc:
        detail = str(exc).splitlines()[0] if str(exc) else ""
        raise ConfigError(f"{key}: {path} cannot be read ({type(exc).__name__}: {detail})") from None


def read_model_state(init_from: str) -> dict[str, torch.Tensor]:
    """The model state stored in ``init_from``: an ``mtl-run`` checkpoint (its ``model``
    entry), a ``{"state_dict": ...}`` file, or a plain state dict. Loaded with
    ``weights_only=True``: a checkpoint from elsewhere is data, never code to execute."""
    path = checkpoint_file(init_from)
    if path is None:
        raise ConfigError(f"init_from={init_from}: no such checkpoint; give a .pt file or a run directory with checkpoints/{LAST_NAME}")
    checkpoint = load(path, f"init_from={init_from}", weights_only=True)
    for candidate in (checkpoint.get("model"), checkpoint.get("state_dict"), checkpoint) if isinstance(checkpoint, dict) else ():
        if isinstance(candidate, dict) and candidate and all(isinstance(v, torch.Tensor) for v in candidate.values()):
            return candidate
    raise ConfigError(f"init_from={init_from}: {path} holds no model state (expected an mtl-run checkpoint or a state dict)")
