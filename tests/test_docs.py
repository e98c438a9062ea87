"""The docs stay true to the repository: generated tables current, links resolvable, and nothing
that points outside the checkout."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from scripts import gen_docs

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*$")
#: A reference to a file of another checkout: the shared folder beside it, or a design or methods
#: page that is not this repository's docs/ page.
OUTSIDE = re.compile(r"\.\./shared|(?<![\w/])(?:design|methods)\.md")
PAGE_BESIDE = "methods" + ".md"


def repository_files() -> list[Path]:
    """Tracked files and new files not ignored by git: what a commit of this tree would hold."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split("\n")
    return [ROOT / name for name in listed if name and (ROOT / name).is_file()]


def text_of(path: Path) -> str | None:
    try:
        return path.read_text()
    except UnicodeDecodeError:
        return None


def outside_fences(text: str) -> list[str]:
    """The lines of a Markdown page that are not inside ``` code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def anchors(page: Path) -> set[str]:
    found: set[str] = set()
    for line in outside_fences(page.read_text()):
        match = HEADING.match(line)
        if match:
            slug = gen_docs.slug(match.group(1))
            suffix = 0
            while (candidate := slug if suffix == 0 else f"{slug}-{suffix}") in found:
                suffix += 1
            found.add(candidate)
    return found


def test_generated_pages_are_current() -> None:
    stale = gen_docs.stale_pages()
    assert not stale, (
        f"generated tables out of date in {', '.join(str(p.relative_to(ROOT)) for p in stale)}: "
        "run python scripts/gen_docs.py"
    )


def test_every_option_is_generated() -> None:
    """Each YAML in conf/<group>/ shows up in the options reference, and the methods' groups in
    the methods index."""
    configuration = (ROOT / "docs/configuration.md").read_text()
    methods = (ROOT / "docs/methods.md").read_text()
    for file in (ROOT / "conf").rglob("*.yaml"):
        group = file.parent.relative_to(ROOT / "conf").as_posix()
        if group == ".":
            continue
        assert f"### `{group}` options" in configuration, f"{group} missing: run python scripts/gen_docs.py"
        assert f"| `{file.stem}` |" in configuration or f"`{group}={file.stem}`" in configuration, (
            f"{file.relative_to(ROOT)} missing from docs/configuration.md: run python scripts/gen_docs.py"
        )
        if group in gen_docs.METHOD_GROUPS:
            assert f"| `{file.stem}` |" in methods, (
                f"{file.relative_to(ROOT)} missing from docs/methods.md: run python scripts/gen_docs.py"
            )


def test_every_method_is_defined_in_the_methods_page() -> None:
    """The generated index lists every method; a definition has to be written by hand."""
    written = gen_docs.MARKER.sub("", (ROOT / "docs/methods.md").read_text())
    undefined = [
        f"{group}={file.stem}"
        for group in gen_docs.METHOD_GROUPS
        for file in sorted((ROOT / "conf" / group).glob("*.yaml"))
        if not re.search(rf"^\| `{re.escape(file.stem)}`", written, re.M)
    ]
    assert not undefined, f"no definition (a table row) in docs/methods.md for: {', '.join(undefined)}"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_relative_links_resolve_inside_the_repository(page: Path) -> None:
    broken = []
    for line in outside_fences(page.read_text()):
        for match in LINK.finditer(line):
            target = match.group(1) or match.group(2)
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto
            path_part, _, anchor = target.partition("#")
            resolved = (page.parent / path_part).resolve() if path_part else page
            if not resolved.is_relative_to(ROOT) or not resolved.exists():
                broken.append(f"{target} (no such file in the repository)")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                broken.append(f"{target} (no heading with that anchor)")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {'; '.join(broken)}"


def test_nothing_refers_to_files_outside_the_repository() -> None:
    offending = []
    for path in repository_files():
        text = text_of(path)
        if text is None:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            for match in OUTSIDE.finditer(line):
                if path.parent == ROOT / "docs" and match.group(0) == PAGE_BESIDE:
                    continue  # a link between docs pages, checked by the link test
                offending.append(f"{path.relative_to(ROOT)}:{number}: {match.group(0)}")
    assert not offending, "references to files outside the repository: " + "; ".join(offending)


def test_cited_docs_pages_exist() -> None:
    """Code and pages cite docs/<page>.md (and #<heading>) by path; each must be in docs/."""
    missing = []
    for path in repository_files():
        text = text_of(path)
        if text is None:
            continue
        for name, anchor in set(re.findall(r"(?<![\w.])docs/([\w/-]+\.md)(?:#([\w-]+))?", text)):
            page = ROOT / "docs" / name
            if not page.is_file():
                missing.append(f"{path.relative_to(ROOT)} cites docs/{name}")
            elif anchor and anchor not in anchors(page):
                missing.append(f"{path.relative_to(ROOT)} cites docs/{name}#{anchor}, a heading the page lacks")
    assert not missing, "; ".join(missing)


def test_readme_keeps_the_install_and_test_commands_ci_runs() -> None:
    """.ci/run installs and tests exactly as the README says."""
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    for command in ('pip install -e ".[dev]"', "pytest"):
        assert command in ci and command in readme, command


def test_readme_is_a_front_door() -> None:
    assert len((ROOT / "README.md").read_bytes()) <= 25_600, "README.md over 25 KB: move detail into docs/"
