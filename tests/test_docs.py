"""Every relative link in README.md and docs/*.md resolves: the file exists, and an #anchor names a
heading of it (GitHub's slugs). Web and mail links are not followed."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
_EXTERNAL = re.compile(r"^(?:[a-z][a-z0-9+.-]*:|//)", re.IGNORECASE)  # http:, https:, mailto:, ...
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_INLINE_CODE = re.compile(r"(`+)(.+?)\1")
# [text](target "title") and ![alt](target); the target may be <wrapped in angle brackets>.
_INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^\s()]+(?:\([^\s()]*\)[^\s()]*)*)")
_REFERENCE_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
_ATX_HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)(?:\s+#+)?\s*$")
_SETEXT_UNDERLINE = re.compile(r"^ {0,3}(=+|-+)\s*$")
_HTML_ANCHOR = re.compile(r"<[^>]+\b(?:id|name)=[\"']([^\"']+)[\"']", re.IGNORECASE)


def _prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    lines: list[str] = []
    fence: str | None = None
    for line in text.splitlines():
        opening = _FENCE.match(line)
        if fence is None and opening:
            fence = opening.group(1)
            continue
        if fence is not None:
            if line.strip().startswith(fence[0] * len(fence)) and not line.strip().strip(fence[0]):
                fence = None
            continue
        lines.append(line)
    return lines


def _heading_text(heading: str) -> str:
    """A heading's text as rendered: code spans kept without backticks, links and images as their
    text, HTML tags and emphasis markers dropped."""
    text = _INLINE_CODE.sub(lambda span: span.group(2).strip(), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"<[^>]+>", "", text)
    return re.sub(r"(?<![\w])_+|_+(?![\w])", "", text)


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case; letters, digits, marks, `_` and `-` kept, other
    punctuation and symbols dropped; each space a `-`."""
    kept = (
        char
        for char in _heading_text(heading).strip().lower()
        if char in " -_" or unicodedata.category(char)[0] in "LNM"
    )
    return "".join(kept).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every anchor a document defines: its headings' slugs (repeats get -1, -2, ... as on GitHub)
    and explicit HTML ids."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    lines = _prose_lines(text)
    headings: list[str] = []
    for index, line in enumerate(lines):
        atx = _ATX_HEADING.match(line)
        if atx:
            headings.append(atx.group(1))
        elif index and _SETEXT_UNDERLINE.match(line):
            previous = lines[index - 1]
            if previous.strip() and not previous.lstrip().startswith(("|", "#", "-", "*", ">")):
                headings.append(previous.strip())
        found.update(_HTML_ANCHOR.findall(line))
    for heading in headings:
        slug = github_slug(heading)
        repeats = seen.get(slug, 0)
        seen[slug] = repeats + 1
        found.add(slug if repeats == 0 else f"{slug}-{repeats}")
    return found


def relative_links(text: str) -> list[str]:
    """The link and image targets that point into the repository (or at an anchor)."""
    targets: list[str] = []
    for line in _prose_lines(text):
        line = _INLINE_CODE.sub(lambda span: " " * len(span.group(0)), line)  # `[x](y)` is no link
        definition = _REFERENCE_DEFINITION.match(line)
        found = [definition.group(1)] if definition else _INLINE_LINK.findall(line)
        targets.extend(target.strip("<>") for target in found)
    return [target for target in targets if target and not _EXTERNAL.match(target)]


def broken_links(document: Path) -> list[str]:
    problems: list[str] = []
    for target in relative_links(document.read_text(encoding="utf-8")):
        path_part, _, anchor = target.partition("#")
        linked = (document.parent / unquote(path_part)).resolve() if path_part else document
        if not linked.exists():
            problems.append(f"{target}: no such file")
            continue
        if not anchor:
            continue
        if linked.is_dir() or linked.suffix.lower() != ".md":
            problems.append(f"{target}: an anchor into something that is not Markdown")
        elif unquote(anchor) not in anchors(linked.read_text(encoding="utf-8")):
            problems.append(f"{target}: no heading #{anchor} in {linked.name}")
    return problems


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: str(path.relative_to(REPO)))
def test_relative_links_resolve(document: Path) -> None:
    assert broken_links(document) == []


def test_the_docs_exist() -> None:
    assert (REPO / "docs").is_dir()
    assert len(DOCUMENTS) > 1


@pytest.mark.parametrize(
    ("heading", "slug"),
    [
        ("The notebook's flow, over the network", "the-notebooks-flow-over-the-network"),
        ("Machine-readable refusals", "machine-readable-refusals"),
        ("`Embed` and `EmbedStream`", "embed-and-embedstream"),
        ("TLS / mutual TLS", "tls--mutual-tls"),
        ("Ranks (`rank`, `world_size`)", "ranks-rank-world_size"),
        ("Where to add [a scan](word-vectors.md) strategy", "where-to-add-a-scan-strategy"),
        ("GloVe 400k \u00d7 50: *fast*", "glove-400k--50-fast"),  # a symbol is dropped
    ],
)
def test_github_slugs(heading: str, slug: str) -> None:
    assert github_slug(heading) == slug


def test_link_extraction_skips_code_and_external_links() -> None:
    text = (
        'See [the protocol](docs/protocol.md#errors) and ![chart](bench/chart.png "title").\n'
        "[web](https://example.com) [mail](mailto:a@b.c) [here](#local) `[not](a-link.md)`\n"
        "```python\n[also not](code.md)\n```\n"
        "[ref]: docs/operations.md\n"
    )
    assert relative_links(text) == [
        "docs/protocol.md#errors",
        "bench/chart.png",
        "#local",
        "docs/operations.md",
    ]


def test_repeated_headings_get_numbered_anchors() -> None:
    text = "# Errors\n\n## Errors\n\nSetext\n------\n\n```\n# not a heading\n```\n"
    assert anchors(text) == {"errors", "errors-1", "setext"}


def test_broken_links_are_reported(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Other page\n\n## A `code` heading\n")
    (tmp_path / "image.png").write_bytes(b"")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n[ok](other.md#a-code-heading) ![ok](image.png) [ok](#page) [ok](other.md)\n"
        "[bad](missing.md) [bad](other.md#nowhere) [bad](#nowhere) [bad](image.png#x)\n"
    )
    assert broken_links(page) == [
        "missing.md: no such file",
        "other.md#nowhere: no heading #nowhere in other.md",
        "#nowhere: no heading #nowhere in page.md",
        "image.png#x: an anchor into something that is not Markdown",
    ]
