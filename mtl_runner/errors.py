"""The errors a user sees as one line (exit code 2), on the lowest floor of the package.

Every layer raises them, from the config validation up to the command line, so they
import nothing from ``mtl_runner``: a module that needs to refuse bad input does not have
to pull in the layer that reports it.
"""

from __future__ import annotations

import logging
from typing import Any

from hydra.utils import get_object

__all__ = ["ConfigError", "DatasetRootError", "ReportError", "locate", "option_name"]


class ConfigError(ValueError):
    """Bad user input: reported as one line, exit code 2. Raised in the preflight (before
    Hydra creates the run directory) wherever the check needs no model or data."""


class DatasetRootError(FileNotFoundError):
    """A dataset's files (or a backbone's pretrained weights) are missing or incomplete;
    the message is one line naming the path, what is expected and where to get it."""


class ReportError(Exception):
    """Bad input to ``mtl-report`` (a path, a column, an output file): one line, exit code 2."""


def locate(path: str) -> Any:
    """The object at a dotted import path (a ``_target_``), as Hydra's ``get_object`` finds
    it, but without the multi-line ERROR record Hydra logs before raising: every caller turns
    the failure into its own one-line error, and the log would print above it."""
    logger = logging.getLogger("hydra.utils")
    was_disabled = logger.disabled
    logger.disabled = True
    try:
        return get_object(path)
    finally:
        logger.disabled = was_disabled


def option_name(obj: object) -> str:
    """The option a user types for this object's class (``surgery=pcgrad``,
    ``sharing=mtan``): the name of the module that defines it, one option per module; what
    a one-line error names."""
    return type(obj).__module__.rsplit(".", 1)[-1]
