"""Every fenced ```bash and ```python block of README.md and docs/**/*.md runs as written.

Each markdown file gets its own copy of the repository (so its blocks write there, not into the checkout) and
its blocks run in document order from the copy's root, as a reader would run them: a later block may use what
an earlier one wrote. ``python`` on a block's PATH is the interpreter running the tests.

A block that cannot run here says so in the markdown, on the line right before its fence:
``<!-- skip: <reason> -->`` (only for what needs real weights, a GPU or hours: the reason is printed by
``pytest -ra``), or ``<!-- slow: <why> -->`` for a long one that still runs (marked ``slow``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
LANGUAGES = ("bash", "python")
MARKER = re.compile(r"^<!--\s*(\w+)\s*(?::\s*(.*?))?\s*-->$")
FENCE = re.compile(r"^```(\S*)\s*$")
# Not copied: version control, environments, caches and earlier outputs.
NOT_COPIED = shutil.ignore_patterns(
    ".git", ".venv", "outputs", ".cache", "__pycache__", ".pytest_cache", "*.egg-info"
)


@dataclass(frozen=True)
class Snippet:
    doc: Path
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    marker: str | None  # "skip" or "slow"
    reason: str | None

    @property
    def id(self) -> str:
        return f"{self.doc.relative_to(REPO)}:{self.line}"


def read_snippets(doc: Path) -> list[Snippet]:
    """The ```bash / ```python blocks of ``doc``, with the marker comment right before each fence."""
    lines = doc.read_text().split("\n")
    out: list[Snippet] = []
    i = 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        start, language = i, fence.group(1)
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            i += 1
        if i == len(lines):
            raise ValueError(f"{doc}:{start + 1}: unclosed code fence")
        if language in LANGUAGES:
            marker = MARKER.match(lines[start - 1].strip()) if start > 0 else None
            out.append(
                Snippet(
                    doc,
                    start + 1,
                    language,
                    "\n".join(lines[start + 1 : i]) + "\n",
                    marker.group(1) if marker else None,
                    marker.group(2) if marker else None,
                )
            )
        i += 1
    return out


SNIPPETS = [s for doc in DOCS for s in read_snippets(doc)]


def test_markers_are_known_and_give_reasons():
    assert SNIPPETS, "no snippets found"
    for s in SNIPPETS:
        if s.marker is not None:
            assert s.marker in ("skip", "slow"), f"{s.id}: unknown marker {s.marker!r}"
            assert s.reason, f"{s.id}: a {s.marker} marker states its reason: <!-- {s.marker}: why -->"
    for doc in DOCS:  # a marker that does not sit right before a fence is a typo that would run the block
        lines = doc.read_text().split("\n")
        for n, line in enumerate(lines[:-1]):
            if MARKER.match(line.strip()) and MARKER.match(line.strip()).group(1) in ("skip", "slow"):
                assert FENCE.match(lines[n + 1]), (
                    f"{doc.relative_to(REPO)}:{n + 1}: marker not before a fence"
                )


def test_reader_finds_blocks_and_markers(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text(
        "text\n```bash\necho one\n```\n<!-- skip: needs a GPU -->\n```python\nprint(2)\n```\n"
        "```bibtex\n@x{}\n```\n<!-- slow: a minute -->\n```bash\necho three\n```\n"
    )
    found = read_snippets(doc)
    assert [(s.language, s.code, s.marker, s.reason) for s in found] == [
        ("bash", "echo one\n", None, None),
        ("python", "print(2)\n", "skip", "needs a GPU"),
        ("bash", "echo three\n", "slow", "a minute"),
    ]
    assert [s.line for s in found] == [2, 6, 13]


LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_relative_links_resolve():
    """Every relative markdown link of README.md, docs/**/*.md and the model card names a file that exists."""
    broken = []
    for doc in [*DOCS, REPO / "assets" / "toyworld" / "README.md"]:
        for target in LINK.findall(doc.read_text()):
            if "://" not in target and not (doc.parent / target).exists():
                broken.append(f"{doc.relative_to(REPO)}: {target}")
    assert not broken, broken


def test_research_tables_are_rectangular_csv():
    """The research record's tables (docs/research/data/*.csv): a header and rows of its width."""
    import csv

    files = sorted((REPO / "docs" / "research" / "data").glob("*.csv"))
    assert files
    for path in files:
        rows = list(csv.reader(path.open()))
        assert len(rows) > 1 and all(len(r) == len(rows[0]) for r in rows), path.name


@pytest.fixture(scope="session")
def copies(tmp_path_factory) -> dict[Path, Path]:
    """One copy of the repository per markdown file, made when its first block runs."""
    made: dict[Path, Path] = {}
    yield made


def repository_copy(copies: dict[Path, Path], doc: Path, tmp_path_factory) -> Path:
    if doc not in copies:
        root = tmp_path_factory.mktemp(doc.stem) / "repo"
        shutil.copytree(REPO, root, ignore=NOT_COPIED)
        copies[doc] = root
    return copies[doc]


def run_snippet(snippet: Snippet, root: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop(
        "PYTHONPATH", None
    )  # the copy's root is the working directory: its packages are the ones imported
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if snippet.language == "bash":
        command = ["bash", "-euo", "pipefail", "-c", snippet.code]
    else:
        command = [sys.executable, "-c", snippet.code]
    return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=1800)


@pytest.mark.parametrize(
    "snippet",
    [pytest.param(s, id=s.id, marks=[pytest.mark.slow] if s.marker == "slow" else []) for s in SNIPPETS],
)
def test_snippet_runs_as_written(snippet: Snippet, copies, tmp_path_factory):
    if snippet.marker == "skip":
        pytest.skip(f"{snippet.id}: {snippet.reason}")
    root = repository_copy(copies, snippet.doc, tmp_path_factory)
    proc = run_snippet(snippet, root)
    assert proc.returncode == 0, (
        f"{snippet.id} failed ({proc.returncode}):\n{snippet.code}\n--- stdout\n{proc.stdout[-3000:]}"
        f"\n--- stderr\n{proc.stderr[-3000:]}"
    )
