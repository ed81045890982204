"""Tokenizers: a byte-level BPE trained on the corpus, or GPT-2's (the paper's, 50,257 tokens)."""

from __future__ import annotations

import functools
import hashlib
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from moemla.data.sources import EOT, DataError
from moemla.folders import TOKENIZER_FILE


def train_bpe(texts: Iterator[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2's scheme) with <|endoftext|> as token 0."""
    if not 257 <= vocab_size <= 65535:
        raise DataError(f"--vocab-size must be in [257, 65535] (256 bytes + <|endoftext|> at least), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=sys.stderr.isatty(),  # its own bar on a terminal; training on 20k stories takes seconds
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(spec: str) -> Tokenizer:
    """`gpt2` (from the Hugging Face hub) or a path to a tokenizer.json."""
    path = Path(spec)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if path.suffix == ".json":
        if not path.is_file():
            raise DataError(f"tokenizer file not found: {path}")
        try:
            return Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception on bad JSON
            raise DataError(f"{path} is not a valid tokenizers JSON file: {err}") from None
    if spec == "gpt2":
        try:
            return Tokenizer.from_pretrained("gpt2")
        except Exception as err:
            raise DataError(
                f"could not fetch the gpt2 tokenizer from the Hugging Face hub ({err}); offline, pass the path "
                "of a local gpt2 tokenizer.json with --tokenizer"
            ) from None
    raise DataError(f"unknown tokenizer {spec!r}: use bpe, gpt2, or the path of a tokenizer.json")


def eot_id(tok: Tokenizer) -> int:
    token = tok.token_to_id(EOT)
    if token is None:
        raise DataError(f"the tokenizer has no {EOT} token, which separates stories; train one with --tokenizer bpe")
    return token


def digest(tok: Tokenizer) -> str:
    """sha256 of the tokenizer's JSON: two folders with equal digests tokenize identically."""
    return hashlib.sha256(tok.to_str().encode()).hexdigest()


@functools.cache
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level map inverted: the printable character that stands for each of the 256 bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def piece_bytes(tok: Tokenizer, token_id: int) -> bytes:
    """The bytes one token stands for: a byte-level token may hold part of a UTF-8 character, which decoding it
    alone turns into U+FFFD (so two such tokens would look the same)."""
    piece = tok.id_to_token(token_id) or ""
    alphabet = _byte_level_alphabet()
    if type(tok.decoder).__name__ == "ByteLevel" and piece and all(c in alphabet for c in piece):
        return bytes(alphabet[c] for c in piece)
    return tok.decode([token_id], skip_special_tokens=False).encode("utf-8")


def token_bytes(tok: Tokenizer) -> np.ndarray:
    """(V,) UTF-8 bytes of text each token stands for; 0 for special tokens such as <|endoftext|>.

    Bits per byte divides a loss by these counts, so tokenizers of any vocabulary compare on the same text.
    """
    vocab = tok.get_vocab_size()
    special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    byte_level = type(tok.decoder).__name__ == "ByteLevel"
    alphabet = _byte_level_alphabet()
    out = np.zeros(vocab, dtype=np.int64)
    for i in range(vocab):
        if i in special:
            continue
        piece = tok.id_to_token(i)
        if piece is None:
            continue
        if byte_level and all(c in alphabet for c in piece):
            out[i] = len(piece)  # one character per byte
        else:  # other tokenizers: the decoded text of the token alone
            out[i] = len(tok.decode([i], skip_special_tokens=False).encode("utf-8"))
    return out
