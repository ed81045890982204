"""Sampling from a model through the Decoder interface: prefill the prompt(s), then one token per step."""

from __future__ import annotations

from collections.abc import Callable

import torch
from tokenizers import Tokenizer

from moemla.data.tokenizer import eot_id
from moemla.inference.decode import Row, Token, decode
from moemla.inference.decoder import Decoder, TorchDecoder
from moemla.inference.sampling import SamplingConfig
from moemla.model import Transformer


def as_decoder(model: Transformer | Decoder) -> Decoder:
    """A Transformer is decoded by TorchDecoder; any Decoder is used as it is."""
    return TorchDecoder(model) if isinstance(model, Transformer) else model


def _check_fits(context: int, prompt_len: int) -> None:
    if prompt_len >= context:
        raise ValueError(
            f"the prompt has {prompt_len} tokens but the model's context is {context}; shorten it or pass --truncate"
        )


DEFAULT = SamplingConfig()


@torch.no_grad()
def generate_ids(
    model: Transformer | Decoder,
    prompt: list[int],
    max_new_tokens: int,
    *,
    temperature: float = DEFAULT.temperature,
    top_k: int | None = DEFAULT.top_k,
    top_p: float | None = DEFAULT.top_p,
    stop: int | None = None,
    seed: int = DEFAULT.seed,
    on_token: Callable[[int], None] | None = None,
) -> list[int]:
    """Continue one prompt until `stop`, `max_new_tokens`, or the model's context is full.

    `model` is a Transformer or any Decoder (torch, numpy, numba); with the same logits and seed all draw the
    same tokens.
    """
    s = SamplingConfig(temperature, top_k, top_p, max_new_tokens, seed)
    return _continue(as_decoder(model), prompt, s, stop, on_token)


def _continue(
    dec: Decoder, prompt: list[int], s: SamplingConfig, stop: int | None, on_token: Callable[[int], None] | None
) -> list[int]:
    if not prompt:
        raise ValueError("the prompt is empty; give at least one token")
    _check_fits(dec.cfg.max_seq_len, len(prompt))
    out: list[int] = []
    for _, event in decode(dec, [Row(prompt, s)], stop):
        if isinstance(event, Token):
            out.append(event.id)
            if on_token is not None:
                on_token(event.id)
    return out


@torch.no_grad()
def generate_ids_batch(
    model: Transformer | Decoder,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float = DEFAULT.temperature,
    top_k: int | None = DEFAULT.top_k,
    top_p: float | None = DEFAULT.top_p,
    stop: int | None = None,
    seeds: list[int] | None = None,
) -> list[list[int]]:
    """Continue several prompts in one batch: left-padded to the longest, the padding masked (KVCache.pad).

    Prompt i samples with its own generator seeded seeds[i] (default i), so it draws the tokens that
    `generate_ids(..., seed=seeds[i])` draws alone, up to float rounding in near-ties. A sequence that
    reaches `stop` is done; the batch runs until all are, or the longest prompt fills the context.
    """
    s = SamplingConfig(temperature, top_k, top_p, max_new_tokens)
    return _continue_batch(as_decoder(model), prompts, s, stop, seeds or list(range(len(prompts))))


def _continue_batch(
    dec: Decoder, prompts: list[list[int]], s: SamplingConfig, stop: int | None, seeds: list[int]
) -> list[list[int]]:
    if dec.max_batch is not None and len(prompts) > dec.max_batch:
        raise ValueError("the numpy decoders run one sequence at a time; batch with the torch model")
    if not prompts or any(not p for p in prompts) or len(seeds) != len(prompts):
        raise ValueError("give one or more non-empty prompts, and one seed per prompt")
    _check_fits(dec.cfg.max_seq_len, max(len(p) for p in prompts))
    out: list[list[int]] = [[] for _ in prompts]
    rows = [Row(p, s.replace(seed=seed)) for p, seed in zip(prompts, seeds, strict=True)]
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
    room = dec.cfg.max_seq_len - min(s.max_new_tokens, dec.cfg.max_seq_len // 2)
    encoded = [tokenizer.encode(p).ids for p in prompts]
    if truncate:
        encoded = [ids[-room:] if len(ids) > room else ids for ids in encoded]  # keep the end, leave room
    if batch_size > 1:
        if stream is not None:
            raise ValueError("streaming shows one sequence as it grows; use batch_size=1 with stream")
        texts = []
        for lo in range(0, len(encoded), batch_size):
            group = encoded[lo : lo + batch_size]
            outs = _continue_batch(dec, group, s, stop, [s.seed + lo + j for j in range(len(group))])
            texts += [
                tokenizer.decode(ids + [t for t in out if t != stop]) for ids, out in zip(group, outs, strict=True)
            ]
        return texts
    texts = []
    for i, ids in enumerate(encoded):
        new: list[int] = []

        def emit(token: int, new: list[int] = new) -> None:
            if stream is None or token == stop:
                return
            before = tokenizer.decode(new)
            new.append(token)
            stream(tokenizer.decode(new)[len(before) :])  # decoded as a whole: multi-byte characters stay intact

        out = _continue(dec, ids, s.replace(seed=s.seed + i), stop, emit)
        texts.append(tokenizer.decode(ids + [t for t in out if t != stop]))
    return texts
