"""The repository reads on its own: every relative link resolves inside it, and no file points
outside it (to a specification that a clone does not have).

Fast and torch-free: it reads Markdown and notebook JSON only, and never imports biotune.
"""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Written in two parts so that this file does not contain what it forbids.
FORBIDDEN = ("../" + "shared", "shared" + "/spec")

FENCED_CODE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1", re.DOTALL)
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+[\"'(][^)]*)?\)")
REFERENCE_LINK = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)", re.MULTILINE)
HTML_LINK = re.compile(r"<(?:a|img)\b[^>]*?\b(?:href|src)\s*=\s*[\"']([^\"']+)[\"']", re.IGNORECASE)
HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$", re.MULTILINE)
HTML_ANCHOR = re.compile(r"<a\b[^>]*?\b(?:id|name)\s*=\s*[\"']([^\"']+)[\"']", re.IGNORECASE)
EXTERNAL = re.compile(r"^(?:[a-z][a-z0-9+.-]*:|//)", re.IGNORECASE)  # http:, https:, mailto:, ...


def links(markdown: str) -> list[str]:
    """Link and image targets of a Markdown text, code blocks and code spans left out."""
    text = INLINE_CODE.sub("", FENCED_CODE.sub("", markdown))
    found = [m.group(1) for pattern in (INLINE_LINK, REFERENCE_LINK, HTML_LINK) for m in pattern.finditer(text)]
    return [target[1:-1] if target.startswith("<") and target.endswith(">") else target for target in found]


def anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a document's headings (lower case, punctuation dropped, spaces to
    hyphens, a repeated heading numbered -1, -2, ...), and its explicit HTML anchors."""
    text, seen, found = FENCED_CODE.sub("", markdown), {}, set()
    for heading in HEADING.findall(text):
        heading = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        found.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return found | set(HTML_ANCHOR.findall(text))


def markdown_sources() -> list[tuple[str, Path, str]]:
    """(label, folder the links are relative to, markdown text) of every document the test covers."""
    files = [ROOT / "README.md", ROOT / "data" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    sources = [(str(path.relative_to(ROOT)), path.parent, path.read_text(encoding="utf-8"))
               for path in files if path.is_file()]
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
        for index, cell in enumerate(cells):
            if cell["cell_type"] == "markdown":
                source = cell["source"]
                text = "".join(source) if isinstance(source, list) else source
                sources.append((f"{notebook.relative_to(ROOT)} cell {index}", notebook.parent, text))
    return sources


def test_the_documents_exist():
    for name in ("README.md", "LICENSE", "CITATION.cff", "docs/algorithm.md", "docs/methods.md",
                 "docs/data.md", "docs/results.md", "docs/performance.md", "docs/scaling.md"):
        assert (ROOT / name).is_file(), f"{name} is missing"


def test_the_link_finder_sees_links_and_skips_code():
    text = ("See [a](docs/a.md#x), ![fig](../f.png \"title\"), <img src=\"g.png\">, [b](<c d.md>)\n"
            "`[not](inline.md)`\n```\n[not](fenced.md)\n```\n[ref]: e.md\n")
    assert links(text) == ["docs/a.md#x", "../f.png", "c d.md", "e.md", "g.png"]


def test_every_relative_link_resolves_inside_the_repository():
    broken = []
    for label, folder, text in markdown_sources():
        for target in links(text):
            if EXTERNAL.match(target):
                continue
            path = target.split("#", 1)[0].split("?", 1)[0]
            if not path:  # an anchor in the same document
                continue
            resolved = (folder / path).resolve()
            if not resolved.is_relative_to(ROOT):
                broken.append(f"{label}: {target} points outside the repository")
            elif not resolved.exists():
                broken.append(f"{label}: {target} does not exist")
    assert not broken, "broken links:\n  " + "\n  ".join(broken)


def test_the_anchor_finder_follows_github():
    text = "# Title\n## 7. The `final` protocol (§7)\n## Notes\n## Notes\n```\n# not a heading\n```\n<a id=\"x\"></a>\n"
    assert anchors(text) == {"title", "7-the-final-protocol-7", "notes", "notes-1", "x"}


def test_every_anchor_names_a_heading_of_its_document():
    missing = []
    for label, folder, text in markdown_sources():
        for target in links(text):
            if EXTERNAL.match(target) or "#" not in target:
                continue
            path, anchor = target.split("#", 1)
            document = (folder / path).resolve() if path else ROOT / label
            if document.suffix != ".md" or not document.is_file():  # notebooks' own cells; broken links: above
                continue
            if anchor not in anchors(document.read_text(encoding="utf-8")):
                missing.append(f"{label}: {target} names no heading of {document.relative_to(ROOT)}")
    assert not missing, "anchors without a heading:\n  " + "\n  ".join(missing)


def repository_files() -> list[Path]:
    """Files git tracks, and untracked ones it does not ignore (new files before their commit)."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                cwd=ROOT, capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        pytest.skip("not a git checkout: the file list comes from git")
    return [ROOT / name for name in listed.decode().split("\0") if name]


def test_no_file_refers_outside_the_repository():
    offenders = []
    for path in repository_files():
        if not path.is_file():  # deleted in the work tree but still in the index
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:  # binary: images, the run store
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if any(forbidden in line for forbidden in FORBIDDEN):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:120]}")
    assert not offenders, "references to a path outside the repository:\n  " + "\n  ".join(offenders)
