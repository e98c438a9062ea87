"""Generate the docs' reference tables from conf/, so they cannot drift from the YAML files.

Every YAML file under ``conf/`` is discovered (no hand-kept list): each folder is a config group,
each file in it an option. For every option the tables give its description (the YAML's header
comment, else the first sentence of its ``_target_``'s docstring), the ``_target_`` and every key
with its default and the comment written beside it. The tables replace what stands between
marker comments in the docs pages::

    <!-- BEGIN GENERATED: options -->
    ...
    <!-- END GENERATED -->

    python scripts/gen_docs.py            # rewrite the generated parts of docs/*.md
    python scripts/gen_docs.py --check    # exit 1, naming the stale pages, if any is out of date

``tests/test_docs.py`` runs the check in-process, so a new YAML file without regenerated docs
fails the test suite.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
DOCS = ROOT / "docs"
PRIMARY_CONFIGS = ("config.yaml", "mtl_affinity.yaml")
#: The groups whose options are the methods defined in docs/methods.md, with the section there.
METHOD_GROUPS = {
    "sharing": "sharing-strategies",
    "balancer": "loss-balancers",
    "surgery": "gradient-surgery",
}
MARKER = re.compile(r"(<!-- BEGIN GENERATED: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- END GENERATED -->)", re.S)
_ABBREVIATIONS = ("al", "e.g", "i.e", "etc", "vs", "cf", "Fig", "resp")
COMMANDS = ("mtl-run ", "mtl-affinity ", "mtl-report ", "python ", "torchrun ")


@dataclass(frozen=True)
class Key:
    path: str
    default: Any
    comment: str


@dataclass(frozen=True)
class Option:
    group: str
    name: str
    file: Path
    header: str
    target: str | None
    extends: tuple[str, ...]
    keys: tuple[Key, ...]


def discover(conf: Path = CONF) -> dict[str, list[Option]]:
    """Every option of every group, groups and options in alphabetical order."""
    groups: dict[str, list[Option]] = {}
    for file in sorted(conf.rglob("*.yaml")):
        relative = file.relative_to(conf)
        if relative.parent == Path("."):
            continue  # the primary configs, which pick the options (see defaults())
        group = relative.parent.as_posix()
        groups.setdefault(group, []).append(read_option(group, file))
    return dict(sorted(groups.items()))


def read_option(group: str, file: Path) -> Option:
    text = file.read_text()
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a mapping at the top level")
    header, comments = comments_of(text)
    extends = tuple(_defaults_entry(entry) for entry in data.get("defaults", []))
    keys = tuple(
        Key(path, value, comments.get(path, ""))
        for path, value in flatten({k: v for k, v in data.items() if k not in ("_target_", "defaults")})
    )
    return Option(group, file.stem, file, header, data.get("_target_"), extends, keys)


def _defaults_entry(entry: Any) -> str:
    if isinstance(entry, dict):
        ((key, value),) = entry.items()
        return f"{key.removeprefix('override ').lstrip('/')}={value}"
    return str(entry)


def flatten(mapping: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Dotted paths of the leaves; a mapping that is empty is a leaf."""
    for key, value in mapping.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from flatten(value, path + ".")
        else:
            yield path, value


def comments_of(text: str) -> tuple[str, dict[str, str]]:
    """(the file's header comment, {dotted key: its comment}) from the YAML source.

    A key's comment is the comment block right above it plus the comment on its own line and
    the comment-only lines indented under it. The block at the very top of the file is the
    header (Hydra's ``# @package`` line excepted), not the first key's comment.
    """
    lines = text.splitlines()
    header: list[str] = []
    index = 0
    while index < len(lines) and lines[index].lstrip().startswith("#"):
        line = lines[index].strip().lstrip("#").strip()
        if not line.startswith("@package"):
            header.append(as_code(line))
        index += 1
    comments: dict[str, list[str]] = {}
    above: list[str] = []
    stack: list[tuple[int, str]] = []
    last_key: str | None = None
    last_indent = 0
    for raw in lines[index:]:
        stripped = raw.strip()
        indent = len(raw) - len(raw.lstrip())
        if not stripped:
            above, last_key = [], None
            continue
        if stripped.startswith("#"):
            note = as_code(stripped.lstrip("#").strip())
            if last_key is not None and indent > last_indent:
                comments[last_key].append(note)
            else:
                above.append(note)
                last_key = None
            continue
        match = re.match(r"([\w.\-/]+):(.*)$", stripped)
        if match is None or stripped.startswith("- "):
            above, last_key = [], None
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = ".".join([name for _, name in stack] + [match.group(1)])
        stack.append((indent, match.group(1)))
        inline = match.group(2).partition(" #")[2].strip() if " #" in match.group(2) else ""
        comments[path] = above + ([inline] if inline else [])
        above, last_key, last_indent = [], path, indent
    return " ".join(header), {path: " ".join(notes) for path, notes in comments.items() if notes}


def as_code(line: str) -> str:
    """A comment line that is a command (an example to copy) as inline code, so that joining
    the comment's lines into one table cell keeps it recognisable."""
    command, _, remark = line.partition("  ")
    if not command.startswith(COMMANDS):
        return line
    remark = remark.strip()
    if remark and not remark.startswith("("):
        remark = f"({remark})"
    return f"`{command}`" + (f" {remark}" if remark else "")


def target_summary(target: str | None) -> str:
    """The first sentence of the target's docstring, or of its module's when the module is
    devoted to one option (its docstring starts with ``group=option``) or the target has none."""
    if target is None:
        return ""
    module_name, _, attribute = target.rpartition(".")
    module = importlib.import_module(module_name)
    obj = getattr(module, attribute)
    own = obj.__dict__.get("__doc__") if isinstance(obj, type) else obj.__doc__
    module_doc = module.__doc__ or ""
    sentence = first_sentence(module_doc if re.match(r"\s*``\+?[\w/]+=", module_doc) or not own else own)
    return re.sub(r"^`\+?[\w/]+=[\w|]+`:\s*", "", sentence)  # the option's own name, which the table shows


def first_sentence(docstring: str) -> str:
    paragraph = " ".join(docstring.strip().split("\n\n")[0].split())
    depth = 0
    for position, char in enumerate(paragraph):
        depth += {"(": 1, ")": -1}.get(char, 0)
        at_end = position + 1 == len(paragraph) or paragraph[position + 1] == " "
        if char == "." and depth == 0 and at_end and not paragraph[:position].endswith(_ABBREVIATIONS):
            return markdown(paragraph[: position + 1])
    return markdown(paragraph)


def markdown(text: str) -> str:
    """reStructuredText inline markup as Markdown."""
    text = re.sub(r":\w+:`~?([\w.]*?)([\w]+)`", r"`\2`", text)
    return text.replace("``", "`")


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def value(default: Any) -> str:
    if default is None:
        return "null"
    if isinstance(default, bool):
        return str(default).lower()
    if isinstance(default, list):
        return "[" + ", ".join(value(item) for item in default) + "]"
    if isinstance(default, dict):
        return "{" + ", ".join(f"{k}: {value(v)}" for k, v in default.items()) + "}"
    return str(default)


def defaults() -> dict[str, str | None]:
    """{group: its default option, None where the group is listed without one} from the primary
    configs' defaults lists. A group absent from them is added with ``+group=option``, except
    Hydra's own groups (``hydra/...``), which Hydra's config lists."""
    chosen: dict[str, str | None] = {}
    for name in PRIMARY_CONFIGS:
        for entry in (yaml.safe_load((CONF / name).read_text()) or {}).get("defaults", []):
            if isinstance(entry, dict):
                ((key, option),) = entry.items()
                chosen[key.removeprefix("optional ")] = None if option is None else str(option)
    return chosen


def default_text(group: str, chosen: dict[str, str | None]) -> str:
    option = chosen.get(group)
    return f"`{option}`" if option is not None else "none"


def selector(group: str, chosen: dict[str, str | None]) -> str:
    plus = "" if group in chosen or group.startswith("hydra/") else "+"
    return f"`{plus}{group}=<option>`"


def keys_inline(option: Option) -> str:
    return "; ".join(
        f"`{key.path}` ({cell(value(key.default))})" + (f": {cell(key.comment)}" if key.comment else "")
        for key in option.keys
    )


def groups_table(groups: dict[str, list[Option]]) -> str:
    chosen = defaults()
    rows = ["| group | default | options | chosen with |", "|---|---|---|---|"]
    for group, options in groups.items():
        names = ", ".join(f"`{option.name}`" for option in options)
        rows.append(
            f"| [`{group}`](#{slug(group + ' options')}) | {default_text(group, chosen)} | {names} | {selector(group, chosen)} |"
        )
    return "\n".join(rows)


def options_section(groups: dict[str, list[Option]]) -> str:
    chosen = defaults()
    parts: list[str] = []
    for group, options in groups.items():
        parts.append(f"### `{group}` options\n")
        parts.append(f"Default: {default_text(group, chosen)}; choose with {selector(group, chosen)}.")
        parts.append("")
        if any(option.target for option in options):
            parts.append("| option | what it is | keys (defaults): notes | YAML notes | `_target_` |")
            parts.append("|---|---|---|---|---|")
            for option in options:
                target = f"`{option.target}`" if option.target else ""
                parts.append(
                    f"| `{option.name}` | {cell(target_summary(option.target))} | {keys_inline(option)} "
                    f"| {cell(option.header)} | {target} |"
                )
            parts.append("")
            continue
        for option in options:
            parts.append(f"**`{group}={option.name}`** (`{option.file.relative_to(ROOT).as_posix()}`)"
                         + (f": {cell(option.header)}" if option.header else ""))
            parts.append("")
            if option.extends:
                parts.append("Extends or overrides: " + ", ".join(f"`{entry}`" for entry in option.extends) + ".")
                parts.append("")
            if option.keys:
                parts.append("| key | default | meaning |")
                parts.append("|---|---|---|")
                for key in option.keys:
                    parts.append(f"| `{key.path}` | `{cell(value(key.default))}` | {cell(key.comment)} |")
                parts.append("")
    return "\n".join(parts).rstrip() + "\n"


def methods_section(groups: dict[str, list[Option]]) -> str:
    parts: list[str] = []
    for group, anchor in METHOD_GROUPS.items():
        parts.append(f"**`{group}`** ([definitions](#{anchor})):\n")
        parts.append("| option | what it is | source |")
        parts.append("|---|---|---|")
        for option in groups.get(group, []):
            source = source_file(option.target)
            link = f"[`{source}`](../{source})" if source else ""
            parts.append(f"| `{option.name}` | {cell(target_summary(option.target))} | {link} |")
        parts.append("")
    return "\n".join(parts).rstrip() + "\n"


def source_file(target: str | None) -> str | None:
    if target is None:
        return None
    module = importlib.import_module(target.rpartition(".")[0])
    path = Path(module.__file__ or "").resolve()
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else None


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


#: Generated section name -> how to render it from the discovered groups.
SECTIONS: dict[str, Callable[[dict[str, list[Option]]], str]] = {
    "groups": groups_table,
    "options": options_section,
    "methods": methods_section,
}


def render(page: str, groups: dict[str, list[Option]]) -> str:
    """The page with every generated section replaced by its current content."""

    def replace(match: re.Match[str]) -> str:
        name = match.group("name")
        if name not in SECTIONS:
            raise ValueError(f"unknown generated section {name!r}; known: {', '.join(SECTIONS)}")
        return f"{match.group(1)}{SECTIONS[name](groups).rstrip()}\n{match.group(4)}"

    return MARKER.sub(replace, page)


def pages(docs: Path = DOCS) -> list[Path]:
    return sorted(page for page in docs.rglob("*.md") if MARKER.search(page.read_text()))


def stale_pages(docs: Path = DOCS) -> list[Path]:
    """The pages whose generated sections differ from what conf/ gives now."""
    groups = discover()
    return [page for page in pages(docs) if render(page.read_text(), groups) != page.read_text()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a generated section is stale")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_pages()
        for page in stale:
            print(f"{page.relative_to(ROOT)} is stale: run python scripts/gen_docs.py")
        return 1 if stale else 0
    groups = discover()
    for page in pages():
        text = page.read_text()
        updated = render(text, groups)
        if updated != text:
            page.write_text(updated)
            print(f"updated {page.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
