"""Every relative link in the README and the docs points at a file that exists (and, for a
`#anchor` into a Markdown file, at a heading that exists), so moving a page or renaming a
section cannot leave a dead link behind. No model, no network: milliseconds."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", ROOT / "bench" / "RESULTS.md",
                ROOT / "bench" / "cache" / "README.md", *(ROOT / "docs").rglob("*.md")])
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def outside_code(text: str) -> list[str]:
    """The lines of a Markdown text that are not inside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(line.lstrip("#")) for line in outside_code(page.read_text())
            if re.match(r"#{1,6} ", line)}


def relative_links(page: Path) -> list[str]:
    return [target for line in outside_code(page.read_text()) for target in LINK.findall(line)
            if not re.match(r"[a-z]+:", target)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    dead = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            dead.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            dead.append(f"{target}: no heading with anchor #{anchor}")
    assert not dead, f"{page.relative_to(ROOT)}: " + "; ".join(dead)


def test_the_check_sees_links_and_skips_code() -> None:
    text = "[a](x.md#b-c)\n```\n[z](ignored.md)\n## Not a heading\n```\n## B, c!\n"
    assert [t for line in outside_code(text) for t in LINK.findall(line)] == ["x.md#b-c"]
    assert slug("B, c!") == "b-c"
    assert slug("2. Sequential quality at N = 100 / 1,000") == "2-sequential-quality-at-n--100--1000"
