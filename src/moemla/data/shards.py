"""Prepared data: tokenized, memory-mapped shards with a validation split held out by story.

A prepared folder holds `manifest.json` (written last, so a folder without it is unfinished),
`tokenizer.json` and `{train,val}_NNN.bin` shards of uint16 (vocab <= 65,536) or uint32 token ids,
each story followed by <|endoftext|>.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from moemla.data.sources import PIECE_CHARS, DataError, Piece, StorySource
from moemla.data.tokenizer import digest, eot_id, load_tokenizer, train_bpe
from moemla.folders import (
    DATA_KEYS,
    MANIFEST,
    TOKENIZER_FILE,
    RecordError,
    assembled,
    check_destination,
    kind,
    read_json,
    read_record,
    write_text_atomic,
)
from moemla.progress import Progress

FORMAT = 1
SPLITS = ("train", "val")
BPE_SAMPLE_CHARS = 50_000_000  # the BPE is trained on at most this much training text
BATCH_CHARS = 2_000_000  # characters tokenized in one encode_batch at most (its encodings take ~300 B per token)


def is_val(index: int, val_fraction: float) -> bool:
    """Story `index` goes to validation: a fixed hash of its position, so the split is by whole story."""
    return (((index + 1) * 0x9E3779B1) & 0xFFFFFFFF) / 2**32 < val_fraction


def _train_texts(source: StorySource, val_fraction: float) -> Iterator[str]:
    chars = 0
    for i, text in enumerate(source()):
        if not is_val(i, val_fraction):
            yield text
            chars += len(text)
            if chars >= BPE_SAMPLE_CHARS:
                return


def _dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


class _ShardWriter:
    """Appends token arrays to NNN-numbered files of at most `shard_tokens` tokens, hashing as it goes."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.shards: list[dict[str, object]] = []
        self.stories = 0
        self._file = None

    def _open(self) -> None:
        name = f"{self.split}_{len(self.shards):03d}.bin"
        self._file = (self.folder / name).open("wb")
        self._hash = hashlib.sha256()
        self.shards.append({"file": name, "tokens": 0})

    def write(self, ids: np.ndarray) -> None:
        self.stories += 1
        if self._file is None or self.shards[-1]["tokens"] >= self.shard_tokens:  # type: ignore[operator]
            self.close()
            self._open()
        data = ids.astype(self.dtype).tobytes()
        self._file.write(data)  # type: ignore[union-attr]
        self._hash.update(data)
        self.shards[-1]["tokens"] += len(ids)  # type: ignore[operator]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self.shards[-1]["sha256"] = self._hash.hexdigest()
            self._file = None

    def summary(self) -> dict[str, object]:
        return {"stories": self.stories, "tokens": sum(s["tokens"] for s in self.shards), "shards": self.shards}


def write_prepared(
    source: StorySource,
    out: str | Path,
    description: dict[str, object],
    *,
    tokenizer: str = "bpe",
    vocab_size: int = 4096,
    val_fraction: float = 0.05,
    shard_tokens: int = 1 << 27,
    overwrite: bool = False,
    chunk: int = 2048,
    sources: tuple[str | Path, ...] = (),
) -> dict[str, object]:
    """Tokenize `source` into `out`; reuse it when already prepared from the same request."""
    if not 0.0 < val_fraction < 0.5:
        raise DataError(f"--val-fraction must be in (0, 0.5), got {val_fraction}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file; give a folder to prepare the data into")
    request = {"source": description, "tokenizer": tokenizer, "vocab_size": vocab_size, "val_fraction": val_fraction}
    given = load_tokenizer(tokenizer) if tokenizer not in ("bpe", "gpt2") else None
    if given is not None:  # a tokenizer.json by path: its content is the identity, not its name
        request["tokenizer_sha256"] = digest(given)
    if kind(out) == "data" and not overwrite:
        old = read_json(out / MANIFEST) or {}
        if old.get("request") == request:
            return old
        changes = request_changes(old.get("request", {}), request)
        raise DataError(
            f"{out} already holds data prepared from another request ({changes}); "
            "a prepared folder never mixes tokenizers or sources: choose another --out, or pass --overwrite"
        )
    check_destination(out, "prepare", sources=sources, overwrite=overwrite, fix="choose another --out")
    _check_splits(source, val_fraction)
    with assembled(out, "prepare") as folder:  # an interrupted prepare leaves what was there
        tok = (
            train_bpe(_train_texts(source, val_fraction), vocab_size)
            if tokenizer == "bpe"
            else given
            if given is not None
            else load_tokenizer(tokenizer)
        )
        folder.mkdir()
        manifest = _write_shards(source, tok, folder, val_fraction, shard_tokens, chunk)
        manifest["request"] = request
        tok.save(str(folder / TOKENIZER_FILE))
        write_text_atomic(folder / MANIFEST, json.dumps(manifest, indent=1))  # the folder's record, last
    return manifest


def request_changes(old: dict, new: dict, most: int = 3) -> str:
    """What differs between two prepare requests, short: the input files that changed, appeared or went (a few by
    name, then a count), or the settings (tokenizer, vocabulary, split) that differ."""
    changes = [f"{k}: {old.get(k)!r} then, {new.get(k)!r} now" for k in ("tokenizer", "tokenizer_sha256",
               "vocab_size", "val_fraction") if old.get(k) != new.get(k)]  # fmt: skip
    before, after = old.get("source", {}), new.get("source", {})
    files = {k: {f["path"]: f.get("sha256") for f in before.get(k, [])} for k in ("files", "documents")}
    now = {k: {f["path"]: f.get("sha256") for f in after.get(k, [])} for k in ("files", "documents")}
    paths = []
    for k in ("files", "documents"):
        a, b = files[k], now[k]
        paths += [f"{p} changed" for p in b if p in a and a[p] != b[p]]
        paths += [f"{p} is new" for p in b if p not in a] + [f"{p} is gone" for p in a if p not in b]
    if paths:
        changes += paths[:most] + ([f"and {len(paths) - most:,} more files"] if len(paths) > most else [])
    elif not changes:
        keys = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        changes = [f"source {k}: {before.get(k)!r} then, {after.get(k)!r} now" for k in keys[:most]]
    return "; ".join(changes) or "the request differs"


def _check_splits(source: StorySource, val_fraction: float) -> None:
    """Before any tokenizer is trained: the input has a training and a validation story. Reads only until both
    are seen (a few dozen stories), or all of a too-small input."""
    seen = {True: 0, False: 0}
    for i, _ in enumerate(source()):
        seen[is_val(i, val_fraction)] += 1
        if seen[True] and seen[False]:
            return
    n = seen[True] + seen[False]
    if n == 0:
        raise DataError("no stories found in the input: check the files or the dataset name")
    raise DataError(
        f"only {n} stor{'y' if n == 1 else 'ies'}: too few to hold out a validation split at {val_fraction:.0%}; "
        "give more text or a larger --val-fraction (in a .txt file, blank lines or <|endoftext|> lines separate "
        "stories)"
    )


def _write_shards(
    source: StorySource, tok: Tokenizer, folder: Path, val_fraction: float, shard_tokens: int, chunk: int
) -> dict[str, object]:
    eot = eot_id(tok)
    dtype = _dtype(tok.get_vocab_size())
    writers = {s: _ShardWriter(folder, s, dtype, shard_tokens) for s in SPLITS}
    texts: list[tuple[int, str]] = []
    cut = {"stories": 0, "pieces": 0}  # stories longer than PIECE_CHARS, and the pieces they were cut into

    def flush() -> None:
        for (i, _), enc in zip(texts, tok.encode_batch([t for _, t in texts]), strict=True):  # parallel in Rust
            writers["val" if is_val(i, val_fraction) else "train"].write(np.array([*enc.ids, eot]))
        texts.clear()

    with Progress("tokenizing", unit="stories") as bar:
        chars = 0
        for i, text in enumerate(source()):
            texts.append((i, text))
            chars += len(text)
            if isinstance(text, Piece):
                cut["stories"] += text.first
                cut["pieces"] += 1
            if len(texts) >= chunk or chars >= BATCH_CHARS:  # bounded in stories and in characters
                bar.advance(len(texts))
                flush()
                chars = 0
        flush()
    for w in writers.values():
        w.close()
    splits = {s: w.summary() for s, w in writers.items()}
    if splits["train"]["stories"] == 0:
        raise DataError("no stories found in the input: check the files or the dataset name")
    if splits["val"]["stories"] == 0:
        raise DataError(
            f"only {splits['train']['stories']} stories: too few to hold out a validation split at "
            f"{val_fraction:.0%}; give more text or a larger --val-fraction"
        )
    return {
        "format": FORMAT,
        "tokenizer": {"vocab_size": tok.get_vocab_size(), "eot_id": eot, "sha256": digest(tok)},
        "dtype": dtype.name,
        "splits": splits,
        "long_stories": {"max_chars": PIECE_CHARS, **cut},  # cut at line ends into stories of at most max_chars
    }


@dataclass
class PreparedData:
    """A prepared folder opened for reading: memory-mapped shards per split."""

    root: Path
    manifest: dict

    @classmethod
    def open(cls, root: str | Path) -> PreparedData:
        root = Path(root)
        path = root / MANIFEST
        if not path.is_file():
            raise DataError(f"{root} is not a prepared data folder: no {MANIFEST}; run `moemla prepare`")
        try:
            manifest = read_record(path, DATA_KEYS, "prepare the folder again with `moemla prepare`")
        except RecordError as err:
            raise DataError(str(err)) from None
        if manifest["format"] != FORMAT:
            raise DataError(f"{root} was prepared by an incompatible moemla version; prepare it again")
        data = cls(root, manifest)
        for split in SPLITS:
            for shard in manifest["splits"][split]["shards"]:
                f = root / shard["file"]
                expected = shard["tokens"] * np.dtype(manifest["dtype"]).itemsize
                if not f.is_file() or f.stat().st_size != expected:
                    raise DataError(f"{f} is missing or truncated; prepare the folder again")
        return data

    @property
    def vocab_size(self) -> int:
        return self.manifest["tokenizer"]["vocab_size"]

    @property
    def sha256(self) -> str:
        """The data's identity: its tokenizer and every shard's checksum, read from the manifest."""
        shards = [s["sha256"] for split in SPLITS for s in self.manifest["splits"][split]["shards"]]
        return hashlib.sha256(json.dumps([self.tokenizer_sha256, shards]).encode()).hexdigest()

    def tokens(self, split: str) -> int:
        return sum(s["tokens"] for s in self.manifest["splits"][split]["shards"])

    @property
    def tokenizer_sha256(self) -> str:
        return self.manifest["tokenizer"]["sha256"]

    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(str(self.root / TOKENIZER_FILE))

    def shards(self, split: str) -> list[np.ndarray]:
        dtype = np.dtype(self.manifest["dtype"])
        return [
            np.memmap(self.root / s["file"], dtype=dtype, mode="r") for s in self.manifest["splits"][split]["shards"]
        ]

    def verify(self) -> None:
        """Recompute every shard's sha256 against the manifest."""
        for split in SPLITS:
            for shard in self.manifest["splits"][split]["shards"]:
                h = hashlib.sha256((self.root / shard["file"]).read_bytes()).hexdigest()
                if h != shard["sha256"]:
                    raise DataError(f"{self.root / shard['file']} does not match its checksum; prepare it again")


def _windows(shards: list[np.ndarray], seq_len: int, fix: str = "use a shorter --seq-len") -> np.ndarray:
    """Number of (seq_len + 1)-token windows that start in each shard."""
    counts = np.array([max(len(s) - seq_len, 0) for s in shards], dtype=np.int64)
    if counts.sum() == 0:
        raise DataError(f"the data holds fewer than {seq_len + 1} tokens per shard; {fix}")
    return counts


def train_batch(
    shards: list[np.ndarray], seq_len: int, *, seed: int, step: int, batch: int, rows: slice
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows `rows` of step `step`'s global batch of random windows: a pure function of (seed, step)."""
    counts = _windows(shards, seq_len)
    starts = np.random.default_rng([seed, step]).integers(0, counts.sum(), size=batch)[rows]
    bounds = np.cumsum(counts)
    which = np.searchsorted(bounds, starts, side="right")
    offsets = starts - (bounds - counts)[which]
    xy = np.stack([shards[s][o : o + seq_len + 1] for s, o in zip(which, offsets, strict=True)]).astype(np.int64)
    xy = torch.from_numpy(xy)  # (B, T + 1)
    return xy[:, :-1], xy[:, 1:]


def eval_batches(
    shards: list[np.ndarray], seq_len: int, batch: int, max_tokens: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive non-overlapping windows over the split, the same every time."""
    # evaluation has no --seq-len: its windows are the run's training sequence length
    _windows(shards, seq_len, f"evaluation scores windows of {seq_len} tokens and the next one (the run's sequence "
                              "length); give a longer text or more data")  # fmt: skip
    rows: list[np.ndarray] = []
    seen = 0
    for s in shards:
        for o in range(0, len(s) - seq_len, seq_len):
            rows.append(s[o : o + seq_len + 1])
            seen += seq_len
            if len(rows) == batch or (max_tokens is not None and seen >= max_tokens):
                xy = torch.from_numpy(np.stack(rows).astype(np.int64))
                yield xy[:, :-1], xy[:, 1:]
                rows = []
            if max_tokens is not None and seen >= max_tokens:
                return
    if rows:
        xy = torch.from_numpy(np.stack(rows).astype(np.int64))
        yield xy[:, :-1], xy[:, 1:]
