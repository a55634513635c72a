"""The docs stay true: the README is a short quick start that links every page under docs/,
every make target and script is in docs/reference.md, every target the docs name exists, and
no link or path leads out of the repository."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from fixtures_repo import ROOT

README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = ["operating", "endpoints", "security", "reference", "benchmarks", "architecture", "testing"]
PAGES += ["pull"]
README_MAX_LINES = 200


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _doc_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def _make_targets() -> set[str]:
    """Every target the Makefile defines, from `make help` and from its rule lines."""
    out = subprocess.run(["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    targets = set(re.findall(r"^\s*make ([a-z][a-z-]*)", out.stdout, re.M))
    for line in _text(ROOT / "Makefile").splitlines():
        rule = re.match(r"([a-z][a-z0-9 -]*[a-z0-9])\s*:(?!=)", line)
        if rule:
            targets.update(rule.group(1).split())
    return targets


def test_every_make_target_is_in_the_reference() -> None:
    reference = _text(DOCS / "reference.md")
    missing = sorted(t for t in _make_targets() if f"make {t}" not in reference)
    assert not missing, f"make targets missing from docs/reference.md: {missing}"


def test_every_make_target_the_docs_name_exists() -> None:
    targets = _make_targets()
    named: dict[str, set[str]] = {}
    for path in _doc_files():
        text = _text(path)
        found = set(re.findall(r"`make ([a-z][a-z0-9-]*)", text))
        found |= set(re.findall(r"^\s*make ([a-z][a-z0-9-]*)", text, re.M))
        for target in found - targets:
            named.setdefault(target, set()).add(path.relative_to(ROOT).as_posix())
    assert not named, f"the docs name make targets the Makefile lacks: {named}"


def test_every_script_is_in_the_reference() -> None:
    reference = _text(DOCS / "reference.md")
    scripts = [p.name for p in (ROOT / "scripts").glob("*.py") if not p.name.startswith("_")]
    missing = [s for s in scripts if f"scripts/{s}" not in reference]
    assert not missing, f"scripts missing from docs/reference.md: {missing}"


def test_readme_names_the_two_setup_commands() -> None:
    text = _text(README)
    assert "make demo" in text and "make test" in text


def test_readme_is_a_short_quick_start() -> None:
    lines = len(_text(README).splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES})"


def test_readme_links_every_docs_page() -> None:
    pages = {p.stem for p in DOCS.glob("*.md")}
    assert set(PAGES) <= pages, f"docs pages missing: {sorted(set(PAGES) - pages)}"
    linked = set(re.findall(r"\]\(docs/([A-Za-z0-9_-]+)\.md(?:#[^)]*)?\)", _text(README)))
    assert not pages - linked, f"README.md does not link: {sorted(pages - linked)}"


@pytest.mark.parametrize("page", PAGES)
def test_every_docs_page_says_who_it_is_for(page: str) -> None:
    lines = _text(DOCS / f"{page}.md").splitlines()
    assert lines and lines[0].startswith("# "), f"docs/{page}.md must open with a title"
    first = next((line for line in lines[1:] if line.strip()), "")
    assert first.startswith("For "), (
        f"docs/{page}.md must open with one sentence saying who it is for ('For ...'), "
        f"not {first!r}"
    )


def test_security_keeps_its_refusal_sections() -> None:
    # Later changes append to these subsections: their titles are part of the page's interface.
    headings = re.findall(r"^#{2,3} .*$", _text(DOCS / "security.md"), re.M)
    wanted = [
        "## What each side refuses",
        "### The endpoint",
        "### The deployer (training machine)",
        "### The service",
    ]
    assert [h for h in headings if h in wanted] == wanted, headings


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {_slug(h) for h in re.findall(r"^#{1,6} (.*)$", _text(path), re.M)}


def test_every_link_stays_in_the_repository() -> None:
    bad = []
    for path in _doc_files():
        for target in re.findall(r"\]\(([^)\s]+)\)", _text(path)):
            where = f"{path.relative_to(ROOT).as_posix()}: ({target})"
            if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("/"):
                bad.append(f"{where} leaves the repository")
                continue
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            if not dest.is_relative_to(ROOT) or not dest.exists():
                bad.append(f"{where} is not a file of this repository")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                bad.append(f"{where} names no heading of {dest.name}")
    assert not bad, "\n".join(bad)


def test_no_reference_to_files_outside_the_repository() -> None:
    outside = ["../shared", "seed/", "seed §", "the seed", "/work/"]
    parent = ROOT.parent.as_posix()
    if parent != "/":
        outside.append(parent + "/")
    found = [
        f"{path.relative_to(ROOT).as_posix()}: {needle!r}"
        for path in _doc_files()
        for needle in outside
        if needle.lower() in _text(path).lower()
    ]
    assert not found, f"the docs point outside the repository: {found}"
