"""The preflight of ``mtl-run`` and ``mtl-affinity``: every job's config composed and
checked before Hydra starts.

Bad input should fail in a second with one line naming the key and what is allowed, and
before Hydra creates any output directory; so each job of the command line (all jobs of
a ``-m`` grid) is composed here, validated (:func:`mtl_runner.config.validate`), its
methods constructed (they check their own arguments) and its dataset's files looked for.
Both commands import it from here, below them, rather than one command from the other.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path
from typing import NoReturn

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.utils import instantiate
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from mtl_runner.build import build_balancer, build_surgery, check_compatible
from mtl_runner.checkpoints import last_checkpoint
from mtl_runner.config import CONF_DIR, PRESENTATION_KEYS, target_keys, validate
from mtl_runner.data.roots import check_dataset
from mtl_runner.errors import ConfigError, DatasetRootError, locate

__all__ = ["INFO_FLAGS", "fail", "override", "preflight"]

#: Hydra flags after which mtl-run only prints something: nothing to validate.
INFO_FLAGS = {"--help", "-h", "--hydra-help", "--info", "--cfg", "-c", "--shell-completion", "-sc", "--resolve"}


def fail(message: str) -> NoReturn:
    """Bad input's exit: one line on stderr, prefixed with the command, exit code 2."""
    print(f"{_prog()}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def override(key: str, value: str) -> str:
    """``key=value`` as Hydra's override grammar reads back exactly ``value``: quoted, so
    that spaces, commas, brackets, ``=`` and non-ASCII characters in a path survive (a
    backslash is doubled only where the grammar would read it as an escape). Plain
    values stay unquoted, as a user would type them."""
    if re.fullmatch(r"[A-Za-z0-9_./-]+", value):
        return f"{key}={value}"
    escaped = re.sub(r'(\\*)("|$)', lambda m: m.group(1) * 2 + ("\\" + m.group(2) if m.group(2) else ""), value)
    return f'{key}="{escaped}"'


def _prog() -> str:
    """The command as typed (mtl-run, mtl-affinity), for error lines."""
    name = Path(sys.argv[0]).name
    return name if name.startswith("mtl-") else "mtl-run"


def _options(group: str) -> list[str]:
    """A group's options as Hydra sees them (those of installed plugins included, e.g.
    ``hydra/launcher=submitit_slurm``), or the YAML files of ``conf/`` outside a compose."""
    if GlobalHydra.instance().is_initialized():
        return GlobalHydra.instance().config_loader().get_group_options(group)
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _job_overrides(overrides: list[str], multirun: bool) -> list[list[str]]:
    """Every job's override list, as the basic sweeper would launch them."""
    if not multirun:
        return [overrides]
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    parsed = OverridesParser.create().parse_overrides(overrides)
    if any(o.key_or_group.startswith(("hydra/sweeper", "hparams_search")) for o in parsed):
        return [[o.input_line for o in parsed if not o.is_sweep_override()]]
    batches = BasicSweeper.split_arguments(parsed, None)
    return [job for batch in batches for job in batch]


def _group_value_error(overrides: list[str]) -> str:
    """One line for a config group given something other than option names."""
    groups = [o for o in overrides if (CONF_DIR / o.split("=", 1)[0].lstrip("+~")).is_dir()]
    named = ", ".join(groups) or " ".join(overrides)
    return f"{named}: a config group takes option names (group=option, or group=[a,b] where it combines options)"


def _explain(exc: Exception, overrides: list[str], config_name: str = "config") -> str:
    """One line for a composition error: which key, what is allowed."""
    if isinstance(exc, MissingConfigException):
        missing = getattr(exc, "missing_cfg_file", None) or ""
        group, _, option = str(missing).rpartition("/")
        if group and _options(group):
            return f"{group}={option}: no such option; allowed: {', '.join(_options(group))}"
        return str(exc).splitlines()[0]
    if isinstance(exc, OverrideParseException):
        return _parse_error(exc)
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, OmegaConfBaseException):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and cause.full_key:
        key = str(cause.full_key)
        parent, _, _ = key.rpartition(".")
        rest = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != key]
        try:
            base = compose(config_name, overrides=rest)
            node = OmegaConf.select(base, parent) if parent else base
            if isinstance(node, DictConfig) and "_target_" in node:  # a method's own parameters
                keys = target_keys(locate(str(node["_target_"])), parent)
            else:
                keys = [str(k) for k in node.keys() if not str(k).startswith("_")] if isinstance(node, DictConfig) else []
            allowed = ", ".join(keys) or "(none)"
        except Exception:
            allowed = ""
        return f"unknown key {key}" + (f"; allowed: {allowed}" if allowed else "")
    if isinstance(cause, ValidationError) and cause.full_key:
        return f"{cause.full_key}: {str(cause.msg).splitlines()[0]}"
    return str(exc).splitlines()[0]


def _parse_error(exc: Exception) -> str:
    detail = str(exc).splitlines()[0]
    return (f"cannot parse override: {detail}; a value with spaces or characters such as , = [ ] {{ }} ' \" "
            f"must be quoted for Hydra inside the shell's quotes, e.g. 'key=\"my value\"'")


def _check_optimizer(node: DictConfig) -> None:
    """The optimizer checks its own arguments' ranges (betas, eps, momentum ...) when
    constructed: built here on one dummy parameter, its complaint becomes one line."""
    try:
        instantiate(node, params=[torch.zeros(1, requires_grad=True)])
    except Exception as exc:  # torch raises ValueError, TypeError or IndexError
        detail = str(exc.__cause__ or exc).splitlines()[0]
        raise ConfigError(f"optimizer={str(node['_target_']).rsplit('.', 1)[-1]}: {detail}") from None


def _sweep_naming(overrides: list[str]) -> list[str]:
    """Name sweep jobs by what varies: overrides shared by every job of the sweep are
    left out of the job directory name (and so of the TensorBoard run name).

    The name must stay unique, or two jobs would write into one directory: a swept
    presentation key (``trainer.device=cpu,cuda``) is kept in the name, and where the
    overrides alone cannot tell jobs apart (a sweeper that draws its own values, such as
    Optuna, or a value listed twice) the job number leads the name again."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    swept = {o.key_or_group for o in parsed if o.is_sweep_override()}
    # A sweeper that draws its values (Optuna) sweeps keys that are not on the command line.
    drawn = any(o.key_or_group in ("hparams_search", "hydra/sweeper") for o in parsed)
    constant = [
        o.key_or_group for o in parsed
        if not o.is_sweep_override() and o.key_or_group not in swept and not o.key_or_group.startswith("hydra")
    ] if swept or drawn else []  # a one-value "sweep": its job is named by what it sets, not "0_"
    excluded = dict.fromkeys([*(k for k in PRESENTATION_KEYS if k not in swept), *constant])
    naming = [f"hydra.job.config.override_dirname.exclude_keys=[{','.join(excluded)}]"]
    if drawn or any(_repeats_a_value(o) for o in parsed if o.is_sweep_override()):
        naming.append("hydra.sweep.subdir=${hydra.job.num}_${hydra.job.override_dirname}")
    return naming


def _repeats_a_value(sweep: Override) -> bool:
    """Whether a sweep override lists one value twice (``lr=0.1,0.1``); a glob or range
    that cannot be listed here is taken as unique."""
    try:
        values = list(sweep.sweep_string_iterator())
    except Exception:  # noqa: BLE001 - only choice sweeps can be listed without the config
        return False
    return len(values) != len(set(values))


def preflight(argv: list[str], config_name: str = "config") -> list[str]:
    """Compose and validate every job, and check that its dataset's files are there,
    before Hydra starts; exit 2 with one line on error.
    Returns extra Hydra overrides to append (job naming for sweeps). ``config_name``: the
    primary config of the command (``mtl_affinity`` for mtl-affinity)."""
    if any(a.split("=", 1)[0] in INFO_FLAGS for a in argv):
        return []
    from hydra._internal.utils import get_args_parser

    args = get_args_parser().parse_args(argv)
    try:
        jobs = _job_overrides(list(args.overrides), bool(args.multirun))
    except OverrideParseException as exc:
        fail(_parse_error(exc))
    extra: list[str] = []
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for job in jobs:
            try:
                cfg = compose(config_name, overrides=job, return_hydra_config=True)
                with open_dict(cfg):
                    hydra_node = cfg.pop("hydra")
            except (ConfigCompositionException, MissingConfigException, OverrideParseException, OmegaConfBaseException) as exc:
                fail(_explain(exc, job, config_name))
            except ValueError as exc:  # Hydra's own checks, e.g. a group given a number: affinity=0
                fail(str(exc).splitlines()[0])
            except TypeError:  # Hydra trips over a group given a list of numbers: +affinity=[0.9]
                fail(_group_value_error(job))
            try:
                validate(cfg)
                # methods check their own arguments (e.g. surgery.c) when constructed: cheap, and before any output
                build_balancer(cfg)
                build_surgery(cfg)
                _check_optimizer(cfg.optimizer)
                check_compatible(cfg)
                check_dataset(cfg.dataset)
                check_dataset(cfg.backbone)  # pretrained weights: fetched now, or one line
            except (ConfigError, DatasetRootError, ValueError) as exc:
                fail(str(exc).splitlines()[0])
            except Exception as exc:  # a method or a user's own class failed on its arguments: still one line
                fail(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'while checking the configuration'}")
            if job is jobs[0] and not cfg.resume:
                _check_writable(hydra_node, bool(args.multirun))
            if cfg.resume:
                extra = _resume_run_dir(str(cfg.resume), list(args.overrides), bool(args.multirun))
            if cfg.trainer.strategy == "ddp":
                extra += _ddp_overrides(cfg, [*job, *extra], bool(args.multirun))
    return extra + (_sweep_naming(list(args.overrides)) if args.multirun else [])


def _check_writable(hydra_node: DictConfig, multirun: bool) -> None:
    """The output directory Hydra is about to create can be created, so a read-only
    place fails with one line, not with Hydra's traceback after it has started."""
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    _probe(key, Path(str(OmegaConf.select(hydra_node, key.removeprefix("hydra.")))).absolute())


def _probe(key: str, target: Path, remedy: str = "") -> None:
    """Whether directories can be made where ``target`` is or will be: probed in its
    nearest existing ancestor (a directory made and removed at once), which catches
    permissions, read-only mounts and pseudo file systems alike."""
    remedy = remedy or f"choose another with {key}=DIR"
    existing = next(p for p in (target, *target.parents) if p.exists())
    if not existing.is_dir():
        fail(f"{key}={target}: {existing} is a file, not a directory; {remedy}")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".mtl-run-probe-", dir=existing))
    except OSError as exc:
        fail(f"{key}={target}: cannot create directories in {existing} ({(exc.strerror or str(exc)).lower()}); {remedy}")


def _ddp_overrides(cfg: DictConfig, overrides: list[str], multirun: bool) -> list[str]:
    """Every rank of a torchrun group runs mtl-run; they join the process group here and
    agree on rank 0's run directory, and only rank 0's Hydra writes .hydra/ and the log."""
    from mtl_runner.train import distributed

    if multirun:
        fail("trainer.strategy=ddp applies to a single run started by torchrun, not to a -m sweep")
    try:
        group = distributed.init_process_group(str(cfg.trainer.device))
    except ConfigError as exc:
        fail(str(exc))
    extra = [] if group.is_main else ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    if any(o.startswith("hydra.run.dir=") for o in overrides):
        return extra
    run_dir = OmegaConf.select(compose("config", overrides=overrides, return_hydra_config=True), "hydra.run.dir")
    return [*extra, override("hydra.run.dir", distributed.broadcast_run_dir(group, str(run_dir)))]


def _resume_run_dir(resume: str, overrides: list[str], multirun: bool) -> list[str]:
    """A resumed run continues in the run directory it resumes (same TensorBoard curves,
    same checkpoints), so Hydra is pointed there."""
    if multirun:
        fail("resume= applies to a single run, not a -m sweep; resume each job by its directory")
    path = Path(resume).expanduser()
    if not last_checkpoint(path).is_file():
        fail(f"resume={resume}: no checkpoint at {last_checkpoint(path)}; give a run directory of mtl-run")
    _probe("resume", path.resolve(), "make it writable, or copy the run directory and resume the copy")
    if any(o.startswith("hydra.run.dir=") for o in overrides):
        return []
    return [override("hydra.run.dir", str(path.resolve()))]

