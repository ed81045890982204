"""Sampling from a model through the Decoder interface: prefill the prompt(s), then one token per step."""

from __future__ import annotations

from collections.abc import Callable

import torch
from tokenizers import Tokenizer

from moemla.data.tokenizer import eot_id
from moemla.inference.decode import Row, Token, decode
from moemla.inference.decoder import Decoder
from moemla.inference.sampling import SamplingConfig, truncate_prompt
from moemla.inference.torch_decoder import TorchDecoder
from moemla.model import Transformer

DEFAULT = SamplingConfig()


def as_decoder(model: Transformer | Decoder) -> Decoder:
    """A Transformer is decoded by TorchDecoder; any Decoder is used as it is."""
    return TorchDecoder(model) if isinstance(model, Transformer) else model


@torch.no_grad()
def generate_ids(
    model: Transformer | Decoder,
    prompt: list[int],
    sampling: SamplingConfig = DEFAULT,
    *,
    stop: int | None = None,
    on_token: Callable[[int], None] | None = None,
) -> list[int]:
    """Continue one prompt until `stop`, `sampling.max_new_tokens`, or the model's context is full.

    `model` is a Transformer or any Decoder (torch, numpy, numba, onnx); with the same logits and seed all draw
    the same tokens.
    """
    out: list[int] = []
    for _, event in decode(as_decoder(model), [Row(prompt, sampling)], stop):
        if isinstance(event, Token):
            out.append(event.id)
            if on_token is not None:
                on_token(event.id)
    return out


@torch.no_grad()
def generate_ids_batch(
    model: Transformer | Decoder,
    prompts: list[list[int]],
    sampling: SamplingConfig = DEFAULT,
    *,
    stop: int | None = None,
    seeds: list[int] | None = None,
) -> list[list[int]]:
    """Continue several prompts in one batch: left-padded to the longest, the padding masked (KVCache.pad).

    Prompt i samples with its own generator seeded seeds[i] (default sampling.seed + i), so it draws the tokens
    that `generate_ids` draws for it alone with that seed, up to float rounding in near-ties. A sequence that
    reaches `stop` is done; the batch runs until all are, or the longest prompt fills the context.
    """
    dec = as_decoder(model)
    seeds = [sampling.seed + i for i in range(len(prompts))] if seeds is None else seeds
    if dec.max_batch is not None and len(prompts) > dec.max_batch:
        raise ValueError(f"this engine decodes {dec.max_batch} sequence(s) at a time; batch with the torch engine")
    if not prompts or len(seeds) != len(prompts):
        raise ValueError("give one or more prompts, and one seed per prompt")
    out: list[list[int]] = [[] for _ in prompts]
    rows = [Row(list(p), sampling.replace(seed=seed)) for p, seed in zip(prompts, seeds, strict=True)]
    for i, event in decode(dec, rows, stop):
        if isinstance(event, Token):
            out[i].append(event.id)
    return out


@torch.no_grad()
def generate(
    model: Transformer | Decoder,
    tokenizer: Tokenizer,
    prompts: list[str],
    sampling: SamplingConfig = DEFAULT,
    *,
    truncate: bool = False,
    stream: Callable[[str], None] | None = None,
    batch_size: int = 1,
) -> list[str]:
    """Prompt text -> prompt plus continuation, stopping at <|endoftext|>; `stream` gets text as it comes.

    batch_size > 1 decodes that many prompts together (torch model; no streaming). Prompt i samples
    with sampling.seed + i either way.
    """
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    s, dec, stop = sampling, as_decoder(model), eot_id(tokenizer)
    encoded = [tokenizer.encode(p).ids for p in prompts]
    if truncate:
        encoded = [truncate_prompt(ids, dec.cfg.max_seq_len, s.max_new_tokens) for ids in encoded]
    if batch_size > 1:
        if stream is not None:
            raise ValueError("streaming shows one sequence as it grows; use batch_size=1 with stream")
        texts = []
        for lo in range(0, len(encoded), batch_size):
            group = encoded[lo : lo + batch_size]
            outs = generate_ids_batch(dec, group, s.replace(seed=s.seed + lo), stop=stop)
            texts += [
                tokenizer.decode(ids + [t for t in out if t != stop]) for ids, out in zip(group, outs, strict=True)
            ]
        return texts
    texts = []
    for i, ids in enumerate(encoded):
        new: list[int] = []
        sent = [0]  # characters streamed so far

        def emit(token: int, new: list[int] = new, sent: list[int] = sent) -> None:
            if stream is None or token == stop:
                return
            new.append(token)
            text = tokenizer.decode(new)  # decoded as a whole: multi-byte characters come out intact
            if not text.endswith("\ufffd"):  # a character still incomplete: wait for its other bytes
                stream(text[sent[0] :])
                sent[0] = len(text)

        out = generate_ids(dec, ids, s.replace(seed=s.seed + i), stop=stop, on_token=emit)
        if stream is not None and len(rest := tokenizer.decode(new)) > sent[0]:
            stream(rest[sent[0] :])  # a last character left incomplete, as U+FFFD, as the full text shows it
        texts.append(tokenizer.decode(ids + [t for t in out if t != stop]))
    return texts
