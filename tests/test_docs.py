"""The project's documents stand on their own.

Code, tests and documents cite QEMU's public specification (``docs/interop/qcow2.txt``, by
section name) or the project's own ``docs/`` folder: never notes that are not in the
repository, nor the numbers of the tickets a change came from. And what they cite exists: every
``docs/*.md`` named is in the tree, every section number cited from ``docs/on-disk.md`` is one
of its headings, and every promise or suite id cited from ``docs/reliability.md`` (D1, S2, C5,
Z3, ...) is defined there.

The files checked are those git tracks (or, without git, every file of the source tree outside
build and cache folders).
"""

from __future__ import annotations

import pathlib
import re
import subprocess

REPO = pathlib.Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
THIS = pathlib.Path(__file__).resolve()

#: Citations of documents that are not part of the project, and of ticket numbers.
FORBIDDEN = [
    re.compile(r"\b(?:DESIGN|RELIABILITY|STYLE|MULTIHOST|NBD)\.md\b"),
    re.compile(r"\b(?:DESIGN|RELIABILITY|STYLE|MULTIHOST)\b"),
    re.compile(r"qcow2-facts"),
    re.compile(r"\.\./shared\b"),
    re.compile(r"\b[Ii]ssue #?[0-9]+"),
]

_SKIP_DIRS = {".git", ".venv", "venv", "build", "dist", "__pycache__", ".pytest_cache",
              ".hypothesis", ".benchmarks", ".mypy_cache"}
_TEXT_SUFFIXES = {".py", ".pyx", ".pxd", ".pyi", ".md", ".txt", ".toml", ".cfg", ".ini", ".sh",
                  ".yml", ".yaml", ""}


def _tracked_files() -> list[pathlib.Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True,
                             check=True, timeout=60).stdout
        names = [n for n in out.decode().split("\0") if n]
    except (OSError, subprocess.SubprocessError):
        names = [str(p.relative_to(REPO)) for p in REPO.rglob("*")
                 if p.is_file() and not _SKIP_DIRS.intersection(p.relative_to(REPO).parts)
                 and not p.name.endswith((".so", ".c", ".html"))
                 and not any(part.endswith(".egg-info") for part in p.parts)]
    files = [REPO / n for n in names]
    assert any(f.name == "README.md" for f in files), "the source tree was not found"
    return [f for f in files if f.is_file() and f.suffix in _TEXT_SUFFIXES]


def _texts() -> dict[pathlib.Path, str]:
    out = {}
    for f in _tracked_files():
        try:
            out[f] = f.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue                    # a binary file (corpus images) cites nothing
    return out


def test_no_citation_of_documents_outside_the_project():
    bad = []
    for f, text in _texts().items():
        if f.resolve() == THIS:
            continue                    # the patterns themselves
        for n, line in enumerate(text.splitlines(), 1):
            if any(p.search(line) for p in FORBIDDEN):
                bad.append(f"{f.relative_to(REPO)}:{n}: {line.strip()}")
    assert not bad, ("cite docs/ or QEMU's docs/interop/qcow2.txt instead of:\n"
                     + "\n".join(bad))


def test_the_project_documents_exist():
    for name in ("architecture.md", "on-disk.md", "reliability.md"):
        assert (DOCS / name).is_file(), f"docs/{name} is missing"
    cited = set()
    for text in _texts().values():
        cited.update(re.findall(r"\bdocs/([\w-]+\.md)\b", text))
    # docs/interop/... is QEMU's tree, not ours
    missing = sorted(c for c in cited if not (DOCS / c).is_file())
    assert not missing, f"cited but not in docs/: {missing}"


def _on_disk_sections() -> set[str]:
    text = (DOCS / "on-disk.md").read_text(encoding="utf-8")
    return set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", text, flags=re.M))


def test_cited_on_disk_sections_exist():
    sections = _on_disk_sections()
    assert {"1", "1.1", "4.5", "7.3", "9"} <= sections, sorted(sections)
    bad = []
    for f, text in _texts().items():
        rel = str(f.relative_to(REPO))
        refs = re.findall(r"docs/on-disk\.md,? (?:§|section )(\d+(?:\.\d+)?)", text)
        if rel in ("engine/format.py", "tests/test_format.py", "docs/on-disk.md"):
            refs += re.findall(r"§(\d+(?:\.\d+)?)", text)   # these cite on-disk.md by § alone
        bad += [f"{rel}: §{r}" for r in refs if r not in sections]
    assert not bad, f"sections not in docs/on-disk.md: {bad}"


def test_cited_reliability_ids_exist():
    text = (DOCS / "reliability.md").read_text(encoding="utf-8")
    defined = set(re.findall(r"\*\*([CDSZ]\d+)\*\*", text))
    defined |= set(re.findall(r"^### (C\d+)\. ", text, flags=re.M))
    assert {"D1", "D4", "S1", "S3", "C1", "C11", "Z1", "Z6"} <= defined, sorted(defined)
    bad = []
    for f, body in _texts().items():
        for m in re.finditer(r"docs/reliability\.md,? ([^)\n]*)", body):
            for ident in re.findall(r"\b([CDSZ]\d+)\b", m.group(1)):
                if ident not in defined:
                    bad.append(f"{f.relative_to(REPO)}: {ident}")
    assert not bad, f"ids not defined in docs/reliability.md: {bad}"
