"""The README and the docs/ pages link only to files and headings that exist, and the README stays short."""

import re
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAX_README_LINES = 300

INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]*)>?(?:\s+[\"'][^\"']*[\"'])?\s*\)")
REFERENCE_DEFINITION = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
INLINE_CODE = re.compile(r"(`+).+?\1")
FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})")
HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def markdown_pages() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def prose_lines(text: str) -> list[str]:
    """Lines outside fenced code blocks: a `[x](y)` inside code is code, not a link."""
    lines, fence = [], None
    for line in text.splitlines():
        opening = FENCE.match(line)
        if fence is None and opening:
            fence = opening.group(1)[0] * 3
        elif fence is not None and line.strip().startswith(fence):
            fence = None
        elif fence is None:
            lines.append(line)
    return lines


def link_targets(text: str) -> list[str]:
    targets = []
    for line in prose_lines(text):
        line = INLINE_CODE.sub("", line)
        targets += INLINE_LINK.findall(line)
        definition = REFERENCE_DEFINITION.match(line)
        if definition:
            targets.append(definition.group(1))
    return targets


def anchors(text: str) -> set[str]:
    """Heading anchors as GitHub renders them, so `page.md#section` links can be checked too."""
    seen: dict[str, int] = {}
    for line in prose_lines(text):
        heading = HEADING.match(line)
        if not heading:
            continue
        words = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading.group(1)).lower()
        slug = re.sub(r"[^\w\- ]", "", words).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        if count:
            seen[f"{slug}-{count}"] = 1
    return set(seen)


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    broken = []
    for target in link_targets(page.read_text()):
        if not target or SCHEME.match(target):
            continue
        path_part, _, anchor = target.partition("#")
        resolved = (page.parent / unquote(path_part)).resolve() if path_part else page
        where = f"{page.relative_to(root)}: {target}"
        if not resolved.exists():
            broken.append(f"{where} (no such file)")
        elif anchor and resolved.suffix == ".md" and anchor.lower() not in anchors(resolved.read_text()):
            broken.append(f"{where} (no such heading)")
    return broken


def test_every_relative_link_in_the_readme_and_docs_resolves():
    broken = [problem for page in markdown_pages() for problem in broken_links(page)]
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_readme_is_short():
    lines = len(README.read_text().splitlines())
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; move detail to docs/"


def test_readme_links_every_docs_page():
    pages = sorted(DOCS.rglob("*.md"))
    # An empty list would make the check below pass vacuously, e.g. if docs/ moved.
    assert pages, f"no pages under {DOCS}"
    linked = {(ROOT / unquote(t.partition("#")[0])).resolve() for t in link_targets(README.read_text())}
    orphans = [str(page.relative_to(ROOT)) for page in pages if page.resolve() not in linked]
    assert not orphans, "docs pages the README does not link: " + ", ".join(orphans)


def test_the_checker_reports_broken_links_and_ignores_code_and_urls(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "there.md").write_text("# A page\n\n## Some section\n")
    page = tmp_path / "docs" / "page.md"
    page.write_text(
        "# Page\n\n"
        "[ok](there.md) [ok anchor](there.md#some-section) [own](#page) ![img](missing.png)\n"
        "[gone](../nowhere.md) [bad anchor](there.md#no-section) [web](https://example.com/x.md)\n"
        "`[code](not-a-link.md)`\n\n```\n[fenced](not-a-link.md)\n```\n\n[ref]: also-missing.md\n"
    )
    assert broken_links(page, root=tmp_path) == [
        "docs/page.md: missing.png (no such file)",
        "docs/page.md: ../nowhere.md (no such file)",
        "docs/page.md: there.md#no-section (no such heading)",
        "docs/page.md: also-missing.md (no such file)",
    ]
