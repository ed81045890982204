"""Where stories come from: the built-in generator, local text files, or TinyStories from the hub."""

from __future__ import annotations

import codecs
import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    from hashlib import _Hash as Hash

from moemla.data import corpus

EOT = "<|endoftext|>"
TINYSTORIES_HUB = "roneneldan/TinyStories"
SUFFIXES = (".txt", ".jsonl", ".parquet")


class DataError(ValueError):
    """Bad data input; the message says what was wrong and what to do."""


StorySource = Callable[[], Iterator[str]]  # called once per pass (tokenizer training, then sharding)

# A story (a document, a .txt file without blank lines) longer than this many characters is cut at line ends into
# stories of about this size, so that reading, BPE training and tokenizing hold one piece at a time: one 50 MB
# document once took 9 GB, and a 200 MB one ran out of memory. Each piece is a `Piece`; the manifest counts them.
PIECE_CHARS = 1_000_000
LINE_BYTES = 1 << 20  # a line longer than this is read (and cut) in parts of this size


class Piece(str):
    """Part of a story longer than PIECE_CHARS, cut at a line end (mid-line only where one line is longer)."""

    first: bool = False  # the first piece of its story


def _piece(text: str, first: bool) -> Piece:
    piece = Piece(text)
    piece.first = first
    return piece


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    sha = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            sha.update(block)
    return sha.hexdigest()


def raw_lines(f: BinaryIO) -> Iterator[bytes]:
    """The file's lines as bytes, a line longer than LINE_BYTES in parts (only the last part ends in a newline)."""
    while raw := f.readline(LINE_BYTES):
        yield raw


def text_lines(path: Path, sha: Hash | None = None) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 text file, a long line in several parts with one number; anything else is a
    DataError naming the file and line. `sha` hashes the bytes read."""
    decode = codecs.getincrementaldecoder("utf-8")().decode  # a part may end inside a character
    with path.open("rb") as f:
        n = 1
        for raw in raw_lines(f):
            if sha is not None:
                sha.update(raw)
            if b"\0" in raw:
                raise DataError(f"{path}:{n}: NUL bytes; this is a binary file, not text: pass UTF-8 text files")
            try:
                yield n, decode(raw)
            except UnicodeDecodeError as err:
                raise DataError(
                    f"{path}:{n}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column {err.start + 1}); convert "
                    f"the file first, e.g. iconv -f latin1 -t utf-8 {path.name} > {path.stem}-utf8{path.suffix}"
                ) from None
            n += raw.endswith(b"\n")
        try:
            decode(b"", final=True)
        except UnicodeDecodeError:
            raise DataError(f"{path}:{n}: the file ends inside a UTF-8 character; is it cut short?") from None


def bounded(lines: Iterator[str]) -> Iterator[str]:
    """One story's lines as its text: whole (stripped) when under PIECE_CHARS, else as Pieces cut at line ends."""
    buf: list[str] = []
    size, first = 0, True
    for line in lines:
        buf.append(line)
        size += len(line)
        if size >= PIECE_CHARS:
            text = "".join(buf)
            yield _piece(text.lstrip() if first else text, first)
            buf, size, first = [], 0, False
    text = "".join(buf)
    if first:
        if text.strip():
            yield text.strip()
    elif text.strip():
        yield _piece(text.rstrip(), False)


def _txt_stories(path: Path, sha: Hash | None = None) -> Iterator[str]:
    """Stories separated by <|endoftext|> lines, or by blank lines when the file has no such marker (a story
    longer than PIECE_CHARS in pieces)."""
    with path.open("rb") as f:
        by_marker = EOT.encode() in f.read(1 << 20)
    lines = (line for _, line in text_lines(path, sha))
    carry: list[str] = []  # what followed a marker on its line: the next story's start

    def story() -> Iterator[str]:
        yield from carry
        carry.clear()
        for line in lines:
            if (EOT in line) if by_marker else not line.strip():
                before, _, after = line.partition(EOT) if by_marker else ("", "", "")
                yield before
                if after.strip():
                    carry.append(after.lstrip())
                return
            yield line
        done.append(True)

    done: list[bool] = []
    while not done:
        yield from bounded(story())


def _jsonl_stories(path: Path, sha: Hash | None = None) -> Iterator[str]:
    for n, line in text_lines(path, sha):
        if not line.strip():
            continue
        try:
            text = json.loads(line)["text"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise DataError(f"{path}:{n}: expected a JSON object with a 'text' field per line ({err})") from None
        if not isinstance(text, str):
            raise DataError(f"{path}:{n}: 'text' must be a string, got {type(text).__name__}")
        if text.strip():
            yield text.strip()


def _parquet_stories(path: Path, sha: Hash | None = None) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    table = pq.ParquetFile(path)
    if "text" not in table.schema_arrow.names:
        raise DataError(f"{path}: no 'text' column (columns: {', '.join(table.schema_arrow.names)})")
    for batch in table.iter_batches(columns=["text"], batch_size=4096):
        for text in batch.column(0).to_pylist():
            if text and text.strip():
                yield text.strip()


def checked_files(paths: Sequence[str | Path]) -> list[Path]:
    """The named input files, each one that exists, is a file of a type we read and is not empty."""
    files = [Path(p) for p in paths]
    if not files:
        raise DataError("no input files given")
    for p in files:
        if p.is_dir():
            raise DataError(f"{p} is a directory; prepare_data reads it as one document per file")
        if not p.is_file():
            raise DataError(f"input file not found: {p}")
        if p.suffix not in SUFFIXES:
            raise DataError(f"{p}: unsupported file type {p.suffix!r}; use one of {', '.join(SUFFIXES)}")
        if p.stat().st_size == 0:
            raise DataError(f"input file is empty: {p}")
    return files


def file_source(paths: Sequence[str | Path], digests: dict[Path, str] | None = None) -> StorySource:
    """Stories from local .txt / .jsonl / .parquet files, checked up front. With `digests` (path -> the sha256
    recorded for it), a file whose bytes differ (it changed meanwhile) stops the read: a .txt or .jsonl is hashed
    as it is read, a .parquet (read by pyarrow) right after."""
    files = checked_files(paths)
    readers = {".txt": _txt_stories, ".jsonl": _jsonl_stories, ".parquet": _parquet_stories}

    def read() -> Iterator[str]:
        for p in files:
            parquet = p.suffix == ".parquet"  # pyarrow reads it: hashed as it is right after
            sha = hashlib.sha256() if digests and not parquet else None
            yield from readers[p.suffix](p, sha)
            if digests and (file_sha256(p) if parquet else sha.hexdigest()) != digests[p]:  # type: ignore[union-attr]
                raise DataError(f"{p} changed while it was being prepared; run the command again once it is done")

    return read


def builtin_source(stories: int, seed: int = 0) -> StorySource:
    if stories < 1:
        raise DataError(f"--stories must be at least 1, got {stories}")
    return lambda: corpus.stories(seed, stories)


def tinystories_source(split: str = "train", limit: int | None = None) -> StorySource:
    """TinyStories streamed from the Hugging Face hub with the `datasets` library."""
    try:
        import datasets
    except ImportError:
        raise DataError(
            "downloading TinyStories needs the `datasets` library (pip install datasets); offline, download "
            "TinyStories text files yourself and pass them with --text"
        ) from None

    def read() -> Iterator[str]:
        try:
            ds = datasets.load_dataset(TINYSTORIES_HUB, split=split, streaming=True)
            for n, row in enumerate(ds):
                if limit is not None and n >= limit:
                    break
                if row["text"].strip():
                    yield row["text"].strip()
        except (ConnectionError, OSError) as err:
            msg = f"could not download {TINYSTORIES_HUB} ({err}); offline, pass local files with --text"
            raise DataError(msg) from None

    return read
