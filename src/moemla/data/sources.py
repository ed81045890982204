"""Where stories come from: the built-in generator, local text files, or TinyStories from the hub."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from moemla.data import corpus

EOT = "<|endoftext|>"
TINYSTORIES_HUB = "roneneldan/TinyStories"
SUFFIXES = (".txt", ".jsonl", ".parquet")


class DataError(ValueError):
    """Bad data input; the message says what was wrong and what to do."""


StorySource = Callable[[], Iterator[str]]  # called once per pass (tokenizer training, then sharding)


def _text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a UTF-8 text file; anything else is a DataError naming the file and line."""
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            if b"\0" in raw:
                raise DataError(f"{path}:{n}: NUL bytes; this is a binary file, not text: pass UTF-8 text files")
            try:
                yield n, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(
                    f"{path}:{n}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column {err.start + 1}); convert "
                    f"the file first, e.g. iconv -f latin1 -t utf-8 {path.name} > {path.stem}-utf8{path.suffix}"
                ) from None


def _txt_stories(path: Path) -> Iterator[str]:
    """Stories separated by <|endoftext|> lines, or by blank lines when the file has no such marker."""
    with path.open("rb") as f:
        by_marker = EOT.encode() in f.read(1 << 20)
    lines: list[str] = []
    for _, line in _text_lines(path):
        if (EOT in line) if by_marker else not line.strip():
            before, _, after = line.partition(EOT) if by_marker else ("", "", "")
            lines.append(before)
            text = "".join(lines).strip()
            if text:
                yield text
            lines = [after.lstrip()] if after.strip() else []
        else:
            lines.append(line)
    text = "".join(lines).strip()
    if text:
        yield text


def _jsonl_stories(path: Path) -> Iterator[str]:
    for n, line in _text_lines(path):
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


def _parquet_stories(path: Path) -> Iterator[str]:
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


def file_source(paths: Sequence[str | Path]) -> StorySource:
    """Stories from local .txt / .jsonl / .parquet files, checked up front."""
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
    readers = {".txt": _txt_stories, ".jsonl": _jsonl_stories, ".parquet": _parquet_stories}

    def read() -> Iterator[str]:
        for p in files:
            yield from readers[p.suffix](p)

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
