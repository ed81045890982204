"""One document per file: a folder or a glob pattern of text files (source code, articles, notes) as a corpus.

`moemla prepare --text DIR` or `--text 'DIR/**/*.py'` takes every matching file as one document (its whole text),
filtered by `--include` / `--exclude` patterns on the path below the folder. Files that are not UTF-8 text are
skipped and counted, so a source tree with a few binaries still prepares.
"""

from __future__ import annotations

import fnmatch
import glob
from collections.abc import Iterator
from pathlib import Path

from moemla.data.sources import DataError, StorySource

GLOB_CHARS = set("*?[")


def is_document_input(spec: str) -> bool:
    """A folder or a glob pattern: read as one document per file (a plain file keeps its own format)."""
    return Path(spec).is_dir() or bool(GLOB_CHARS & set(spec))


def _candidates(spec: str) -> tuple[Path, list[Path]]:
    """(root the patterns match against, files)."""
    if Path(spec).is_dir():
        root = Path(spec)
        return root, sorted(p for p in root.rglob("*") if p.is_file())
    root = Path(spec.split("*")[0].split("?")[0].split("[")[0] or ".")
    root = root if root.is_dir() else root.parent
    return root, sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())


def _matches(rel: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(rel, pat) or fnmatch.fnmatch(Path(rel).name, pat) for pat in patterns)


def _is_text(path: Path) -> bool:
    data = path.read_bytes()
    if b"\0" in data:
        return False
    try:
        return bool(data.decode("utf-8").strip())
    except UnicodeDecodeError:
        return False


def find_documents(
    spec: str, include: list[str] | None = None, exclude: list[str] | None = None
) -> tuple[list[Path], int]:
    """(UTF-8 text files of a folder or glob, filtered; how many matching files were skipped as not text).
    Patterns match the path below the folder (`*/test/*`) or the file name (`*.py`)."""
    root, files = _candidates(spec)
    picked = []
    for path in files:
        rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.as_posix()
        if include and not _matches(rel, include):
            continue
        if exclude and _matches(rel, exclude):
            continue
        picked.append(path)
    texts = [p for p in picked if _is_text(p)]
    if not texts:
        why = f"{len(picked)} matching files, none UTF-8 text" if picked else "no file matches"
        raise DataError(f"{spec}: {why}; check the path and --include/--exclude")
    return texts, len(picked) - len(texts)


def document_source(files: list[Path]) -> StorySource:
    """Each file's whole text as one document, in a fixed (sorted) order."""

    def read() -> Iterator[str]:
        for path in files:
            yield path.read_text(encoding="utf-8").strip()

    return read
