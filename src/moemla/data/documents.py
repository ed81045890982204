"""One document per file: a folder or a glob pattern of text files (source code, articles, notes) as a corpus.

`moemla prepare --text DIR` or `--text 'DIR/**/*.py'` takes every matching file as one document (its whole text),
filtered by `--include` / `--exclude` patterns on the path below the folder. Both forms find the same files: a
walk that never follows a symlink to a folder (a link to `.` once turned 20 files into 820 and two such links hung
the command), reads each real file once, and skips hidden files and folders (`.git` among them), as the shell's
glob does. `.jsonl` and `.parquet` files found there are read in their own format, a story per record, as when
named directly. Files that are not UTF-8 text, or cannot be read, are skipped and counted, so a source tree with
a few binaries still prepares. Each document's sha256 is of the very bytes that are tokenized: a file that changes
while it is prepared stops the command instead of being recorded wrongly.
"""

from __future__ import annotations

import codecs
import fnmatch
import hashlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from moemla.data.sources import DataError, StorySource, bounded, text_lines

GLOB_CHARS = set("*?[")
OWN_FORMAT = (".jsonl", ".parquet")  # a story per record, in a folder as when named directly


def is_document_input(spec: str) -> bool:
    """A folder or a glob pattern: read as one document per file (a plain file keeps its own format)."""
    return Path(spec).is_dir() or bool(GLOB_CHARS & set(spec))


def glob_regex(pattern: str) -> re.Pattern[str]:
    """A glob pattern as a regex on '/'-separated relative paths: `*` and `?` within a name, `**` across folders,
    `[...]` (and `[!...]`) one character of a set."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:[^/]+/)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] in "*?":
            out.append("[^/]*" if pattern[i] == "*" else "[^/]")
            i += 1
        elif pattern[i] == "[" and (end := pattern.find("]", i + 2)) > 0:
            body = pattern[i + 1 : end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body).replace("\\", "\\\\") + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def split_spec(spec: str) -> tuple[Path, str | None]:
    """(folder to walk, pattern of the paths below it, None for every file): `src/**/*.py` -> (src, **/*.py)."""
    if Path(spec).is_dir():
        return Path(spec), None
    parts = Path(spec).parts
    fixed = next((i for i, part in enumerate(parts) if GLOB_CHARS & set(part)), len(parts))
    return Path(*parts[:fixed]) if fixed else Path("."), "/".join(parts[fixed:])


def walk(root: Path, skip: tuple[Path, ...] = ()) -> list[Path]:
    """Files below root in sorted order: never through a symlink to a folder, each real file once, hidden names
    and the folders in `skip` (a prepare's own output) left out."""
    skip_real = {p.resolve() for p in skip}
    seen: set[Path] = set()
    found = []
    for folder, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and Path(folder, d).resolve() not in skip_real)
        for name in sorted(files):
            path = Path(folder, name)
            if name.startswith(".") or not path.is_file():  # a broken link, a socket
                continue
            real = path.resolve()
            if real not in seen:
                seen.add(real)
                found.append(path)
    return sorted(found)


def _matches(rel: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(rel, pat) or fnmatch.fnmatch(Path(rel).name, pat) for pat in patterns)


@dataclass
class Found:
    """What a folder or pattern holds: documents (path -> sha256 of its bytes), files in their own format, and
    what was skipped."""

    documents: dict[Path, str] = field(default_factory=dict)
    own_format: list[Path] = field(default_factory=list)
    not_text: int = 0
    unreadable: int = 0

    def skipped(self) -> str:
        parts = [f"{self.not_text:,} not UTF-8 text"] * bool(self.not_text)
        parts += [f"{self.unreadable:,} unreadable"] * bool(self.unreadable)
        return f" (skipped: {', '.join(parts)})" if parts else ""


def _text_digest(path: Path) -> str | None:
    """sha256 of a UTF-8 text file's bytes, read in blocks (a 1 GB document must not be held whole); None for
    binary or empty text. OSError when it cannot be read."""
    sha, decode, text = hashlib.sha256(), codecs.getincrementaldecoder("utf-8")().decode, False
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            if b"\0" in block:
                return None
            try:
                text = text or bool(decode(block).strip())
            except UnicodeDecodeError:
                return None
            sha.update(block)
    try:
        decode(b"", final=True)
    except UnicodeDecodeError:
        return None
    return sha.hexdigest() if text else None


def find_documents(
    spec: str, include: list[str] | None = None, exclude: list[str] | None = None, skip: tuple[Path, ...] = ()
) -> Found:
    """The UTF-8 text files (and `.jsonl`/`.parquet` files) of a folder or glob, filtered. Patterns match the
    path below the folder (`*/test/*`) or the file name (`*.py`)."""
    root, pattern = split_spec(spec)
    regex = glob_regex(pattern) if pattern is not None else None
    found = Found()
    picked = 0
    for path in walk(root, skip):
        rel = path.relative_to(root).as_posix()
        if (regex and not regex.match(rel)) or (include and not _matches(rel, include)):
            continue
        if exclude and _matches(rel, exclude):
            continue
        picked += 1
        if path.suffix in OWN_FORMAT:
            found.own_format.append(path)
            continue
        try:
            digest = _text_digest(path)
        except OSError:  # unreadable, an I/O error, deleted since the walk
            found.unreadable += 1
            continue
        if digest is None:
            found.not_text += 1
        else:
            found.documents[path] = digest
    if not found.documents and not found.own_format:
        why = f"{picked} matching files, none UTF-8 text{found.skipped()}" if picked else "no file matches"
        raise DataError(f"{spec}: {why}; check the path and --include/--exclude")
    return found


def document_source(documents: dict[Path, str]) -> StorySource:
    """Each file's whole text as one document (a long one in Pieces, read a line at a time), in a fixed (sorted)
    order; its bytes must still be those whose sha256 the scan recorded."""

    def lines(path: Path, digest: str) -> Iterator[str]:
        sha = hashlib.sha256()
        try:
            for _, line in text_lines(path, sha):  # a file no longer UTF-8 text is named, with its line
                yield line
        except OSError as err:
            raise DataError(f"{path} can no longer be read ({err.strerror}); run the command again") from None
        if sha.hexdigest() != digest:
            raise DataError(f"{path} changed while it was being prepared; run the command again once it is done")

    def read() -> Iterator[str]:
        for path, digest in documents.items():
            yield from bounded(lines(path, digest))

    return read
