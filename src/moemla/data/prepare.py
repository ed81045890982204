"""A named dataset (builtin, tinystories) or local text files -> a prepared folder: the one entry to data/."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from moemla.data.documents import document_source, find_documents, is_document_input
from moemla.data.shards import write_prepared
from moemla.data.sources import (
    DataError,
    StorySource,
    builtin_source,
    checked_files,
    file_sha256,
    file_source,
    tinystories_source,
)

# the defaults of `moemla prepare`, the demo and `moemla reproduce`, in one place
VOCAB_SIZE = 4096  # a byte-level BPE of a few thousand tokens: at small sizes GPT-2's 50,257 would be mostly embedding
STORIES = 20_000
VAL_FRACTION = 0.05


def prepare_data(
    *,
    dataset: str = "builtin",
    text: list[str] | None = None,
    out: str | Path | None = None,
    tokenizer: str = "bpe",
    vocab_size: int = VOCAB_SIZE,
    stories: int = STORIES,
    corpus_seed: int = 0,
    val_fraction: float = VAL_FRACTION,
    overwrite: bool = False,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    log: Callable[[str], None] = print,
) -> tuple[Path, dict]:
    """Resolve the source, then tokenize it into a prepared folder (reused when already there)."""
    if text:
        source, description = _text_source(text, include or [], exclude or [], log, Path(out or "data/text"))
        name = "text"
    elif dataset == "builtin":
        source = builtin_source(stories, corpus_seed)
        description = {"dataset": "builtin", "stories": stories, "seed": corpus_seed}
        name = "builtin"
    elif dataset == "tinystories":
        source = tinystories_source(limit=stories)
        description = {"dataset": "tinystories", "limit": stories}
        name = "tinystories"
    else:
        raise DataError(f"unknown dataset {dataset!r}: use builtin or tinystories, or local files with --text")
    folder = Path(out or f"data/{name}")
    manifest = write_prepared(
        source, folder, description, tokenizer=tokenizer, vocab_size=vocab_size, val_fraction=val_fraction,
        overwrite=overwrite, sources=tuple(t for t in text or () if Path(t).exists()),
    )  # fmt: skip
    return folder, manifest


def _text_source(
    text: list[str], include: list[str], exclude: list[str], log: Callable[[str], None], out: Path
) -> tuple[StorySource, dict[str, object]]:
    """Plain files by their format (stories per file); folders and glob patterns one document per file (their
    .jsonl and .parquet files by their format). The output folder is never its own input."""
    files: list[str | Path] = [t for t in text if not is_document_input(t)]
    docs: dict[Path, str] = {}
    for spec in (t for t in text if is_document_input(t)):
        found = find_documents(spec, include, exclude, skip=(out,))
        own = f" and {len(found.own_format):,} .jsonl/.parquet files" if found.own_format else ""
        log(f"{spec}: {len(found.documents):,} documents{own}{found.skipped()}")
        docs |= found.documents
        files += found.own_format
    if (include or exclude) and not any(is_document_input(t) for t in text):
        raise DataError("--include and --exclude filter folders and glob patterns; give one with --text")
    if files:
        checked_files(files)  # before hashing: missing, a folder, a type we do not read, empty
    identities = [file_identity(p) for p in files]  # the bytes the read must find again
    digests = {Path(p): ident["sha256"] for p, ident in zip(files, identities, strict=True)}
    sources = ([file_source(files, digests)] if files else []) + ([document_source(docs)] if docs else [])

    def read() -> Iterator[str]:
        for source in sources:
            yield from source()

    description: dict[str, object] = {"dataset": "text", "files": identities}
    if docs:  # one document per file, identified by the bytes the scan read (and the read checks)
        description["documents"] = [{"path": str(p.resolve()), "bytes": p.stat().st_size, "sha256": digest}
                                     for p, digest in docs.items()]  # fmt: skip
    return read, description


def file_identity(path: str | Path) -> dict[str, object]:
    """Path, size and content hash of an input file: a prepared folder is reused only for the same content."""
    p = Path(path)
    return {"path": str(p.resolve()), "bytes": p.stat().st_size, "sha256": file_sha256(p)}
