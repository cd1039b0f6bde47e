"""Every relative link in the documentation leads somewhere: a file of this repository, and a heading
of it when the link names one. The repository must be readable on its own, so no link leaves it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

ROOT = Path(REPO_ROOT).resolve()
DOCUMENTS = sorted([ROOT / "README.md", ROOT / "bench" / "README.md", *(ROOT / "docs").glob("*.md")])

FENCE = re.compile(r"^(```|~~~).*?^\1", re.DOTALL | re.MULTILINE)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
EXTERNAL = ("http://", "https://", "mailto:")


def _prose(text: str) -> str:
    """The text without code, where `[x](y)` is not a link."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def _anchors(document: Path) -> set[str]:
    anchors: set[str] = set()
    for heading in HEADING.findall(FENCE.sub("", document.read_text(encoding="utf-8"))):
        slug = base = _slug(heading)
        suffix = 0
        while slug in anchors:  # GitHub numbers repeated headings: x, x-1, x-2
            suffix += 1
            slug = f"{base}-{suffix}"
        anchors.add(slug)
    return anchors


def _broken_links(document: Path, root: Path = ROOT) -> list[str]:
    broken = []
    for target in LINK.findall(_prose(document.read_text(encoding="utf-8"))):
        if target.startswith(EXTERNAL):
            continue
        path_part, _, anchor = target.partition("#")
        resolved = (document.parent / path_part).resolve() if path_part else document
        if not resolved.is_relative_to(root):
            broken.append(f"{target}: outside the repository")
        elif not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{target}: no heading #{anchor} in {resolved.relative_to(root)}")
    return broken


def test_the_documents_exist() -> None:
    assert len(DOCUMENTS) >= 3
    assert all(document.is_file() for document in DOCUMENTS)


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_relative_link_resolves(document: Path) -> None:
    assert _broken_links(document) == []


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: str(path.relative_to(ROOT)))
def test_no_document_points_outside_the_repository(document: Path) -> None:
    """Not even in code spans: a reader of the repository alone cannot follow `../elsewhere`."""
    assert "../shared/" not in document.read_text(encoding="utf-8")


def test_the_slugs_follow_github() -> None:
    assert _slug("10. The admin web view") == "10-the-admin-web-view"
    assert _slug("The SDK: `RemoteModel`") == "the-sdk-remotemodel"
    assert _slug("Verified compute (spot checks)") == "verified-compute-spot-checks"
    assert _slug("Where a step's time goes") == "where-a-steps-time-goes"


def test_a_broken_link_is_found(tmp_path: Path) -> None:
    document = tmp_path / "guide.md"
    text = "# Guide\n\n[ok](#guide) [gone](#nowhere) [file](missing.md) [up](../x.md) `[code](a.md)`\n"
    document.write_text(text + "\n```\n[code](no.md)\n```\n")
    assert _broken_links(document, root=tmp_path) == [
        "#nowhere: no heading #nowhere in guide.md",
        "missing.md: no such file",
        "../x.md: outside the repository",
    ]


CODE_PATH = re.compile(r"`((?:coop|tests|bench|scripts|docker|proto)/[\w./-]*\w)`")
MODULE = re.compile(r"`(coop(?:\.[a-z_]+)+)")


def _missing_module(dotted: str) -> bool:
    """Whether `coop.a.b.name` names nothing: packages down to a module, then a name defined in it. A first part
    that is no part of coop (`coop.sampling`, a response field) is not a module reference."""
    top, *rest = dotted.split(".")[1:]
    at = ROOT / "coop"
    if not (at / top).is_dir() and not (at / f"{top}.py").exists():
        return False
    for index, part in enumerate([top, *rest]):
        if (at / part / "__init__.py").exists():
            at = at / part
        elif (at / f"{part}.py").exists():
            source = (at / f"{part}.py").read_text(encoding="utf-8")
            names = rest[index:]
            return bool(names) and not re.search(rf"^\s*(?:class|def|async def)?\s*{names[0]}\b", source, re.MULTILINE)
        else:
            return True
    return False


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda d: str(d.relative_to(ROOT)))
def test_every_path_the_documentation_names_exists(document: Path) -> None:
    """Modules move; a page that names `coop/x/y.py` must follow, or a newcomer looks for nothing."""
    text = document.read_text(encoding="utf-8")
    missing = [p for p in CODE_PATH.findall(text) if not (ROOT / p).exists()]
    missing += [m for m in MODULE.findall(text) if _missing_module(m)]
    assert not missing, f"{document.relative_to(ROOT)} names paths that do not exist: {missing}"
