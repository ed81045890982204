"""Sampling from a trained model with the preallocated KV cache: prefill the prompt, then one token per step."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from tokenizers import Tokenizer

from moemla.data.tokenizer import eot_id
from moemla.inference.cpu.decoder import NumpyDecoder
from moemla.model import KVCache, Transformer


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """logits (B, V) with everything outside the top-k and outside the top-p nucleus set to -inf."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens before it already cover top_p; the most likely token always stays
        drop_sorted = cumulative - sorted_logits.softmax(-1) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(
    logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None, generator: torch.Generator
) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V); temperature 0 is greedy."""
    if temperature == 0:
        if logits.device.type == "cpu":  # NOTE: numpy's argmax over 50K logits takes ~4 us, torch's ~45 us here
            return torch.from_numpy(logits.float().numpy().argmax(-1))
        return logits.argmax(-1)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def check_sampling(temperature: float, top_k: int | None, top_p: float | None, max_new_tokens: int) -> None:
    """The one check of sampling settings, for the CLI and the Python API alike: ValueError naming the flag."""
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"--temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"--top-k must be at least 1 (or left out for no limit), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1] (1 = no nucleus cut), got {top_p}")
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")


def _check_fits(context: int, prompt_len: int) -> None:
    if prompt_len >= context:
        raise ValueError(
            f"the prompt has {prompt_len} tokens but the model's context is {context}; shorten it or pass --truncate"
        )


@torch.no_grad()
def generate_ids(
    model: Transformer | NumpyDecoder,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop: int | None = None,
    seed: int = 0,
    on_token: Callable[[int], None] | None = None,
) -> list[int]:
    """Continue one prompt until `stop`, `max_new_tokens`, or the model's context is full.

    `model` is a torch Transformer or a NumpyDecoder; with the same logits and seed both draw the same tokens.
    """
    cfg = model.cfg
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    if not prompt:
        raise ValueError("the prompt is empty; give at least one token")
    _check_fits(cfg.max_seq_len, len(prompt))
    max_len = min(cfg.max_seq_len, len(prompt) + max_new_tokens)
    if isinstance(model, NumpyDecoder):
        device = torch.device("cpu")
        model.reset()
        if model.max_len < max_len:
            raise ValueError(f"the decoder's cache holds {model.max_len} tokens; {max_len} are needed")

        def run(ids: list[int]) -> torch.Tensor:
            return torch.from_numpy(model.forward(ids))[None]  # (1, V), shares memory

        def full() -> bool:
            return model.length == max_len
    else:
        device = next(model.parameters()).device
        cache = KVCache(cfg, batch_size=1, max_len=max_len, device=device)

        def run(ids: list[int]) -> torch.Tensor:
            return model(torch.tensor([ids], device=device), cache=cache)[0][:, -1]

        def full() -> bool:
            return cache.length == cache.max_len

    generator = torch.Generator(device=device).manual_seed(seed)
    logits = run(prompt)  # prefill
    out: list[int] = []
    while len(out) < max_new_tokens:
        out.append(int(sample(logits, temperature, top_k, top_p, generator)))
        if on_token is not None:
            on_token(out[-1])
        if out[-1] == stop or full():
            break
        logits = run([out[-1]])  # one decode step
    return out


@torch.no_grad()
def generate_ids_batch(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop: int | None = None,
    seeds: list[int] | None = None,
) -> list[list[int]]:
    """Continue several prompts in one batch: left-padded to the longest, the padding masked (KVCache.pad).

    Prompt i samples with its own generator seeded seeds[i] (default i), so it draws the tokens that
    `generate_ids(..., seed=seeds[i])` draws alone, up to float rounding in near-ties. A sequence that
    reaches `stop` is done; the batch runs until all are, or the longest prompt fills the context.
    """
    if isinstance(model, NumpyDecoder):
        raise ValueError("the numpy decoders run one sequence at a time; batch with the torch model")
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    cfg, seeds = model.cfg, seeds or list(range(len(prompts)))
    if not prompts or any(not p for p in prompts) or len(seeds) != len(prompts):
        raise ValueError("give one or more non-empty prompts, and one seed per prompt")
    longest = max(len(p) for p in prompts)
    _check_fits(cfg.max_seq_len, longest)
    device = next(model.parameters()).device
    pad = [longest - len(p) for p in prompts]
    cache = KVCache(cfg, len(prompts), max_len=min(cfg.max_seq_len, longest + max_new_tokens), device=device, pad=pad)
    generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    ids = torch.tensor([[0] * n + p for n, p in zip(pad, prompts, strict=True)], device=device)  # (B, longest)
    logits = model(ids, cache=cache)[0][:, -1]  # (B, V): prefill
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for _ in range(max_new_tokens):
        step = [int(sample(logits[i : i + 1], temperature, top_k, top_p, g)) for i, g in enumerate(generators)]
        for i, token in enumerate(step):
            if not done[i]:
                out[i].append(token)
                done[i] = token == stop
        if all(done) or cache.length == cache.max_len:
            break
        logits = model(torch.tensor(step, device=device)[:, None], cache=cache)[0][:, -1]  # one decode step
    return out


def generate(
    model: Transformer | NumpyDecoder,
    tokenizer: Tokenizer,
    prompts: list[str],
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = 40,
    top_p: float | None = None,
    seed: int = 0,
    truncate: bool = False,
    stream: Callable[[str], None] | None = None,
    batch_size: int = 1,
) -> list[str]:
    """Prompt text -> prompt plus continuation, stopping at <|endoftext|>; `stream` gets text as it comes.

    batch_size > 1 decodes that many prompts together (torch model; no streaming). Prompt i samples
    with seed + i either way.
    """
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    stop = eot_id(tokenizer)
    room = model.cfg.max_seq_len - min(max_new_tokens, model.cfg.max_seq_len // 2)
    encoded = [tokenizer.encode(p).ids for p in prompts]
    if truncate:
        encoded = [ids[-room:] if len(ids) > room else ids for ids in encoded]  # keep the end, leave room
    if batch_size > 1:
        if stream is not None:
            raise ValueError("streaming shows one sequence as it grows; use batch_size=1 with stream")
        texts = []
        for lo in range(0, len(encoded), batch_size):
            group = encoded[lo : lo + batch_size]
            seeds = [seed + lo + j for j in range(len(group))]
            outs = generate_ids_batch(model, group, max_new_tokens, temperature, top_k, top_p, stop, seeds)
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

        out = generate_ids(model, ids, max_new_tokens, temperature, top_k, top_p, stop, seed + i, emit)
        texts.append(tokenizer.decode(ids + [t for t in out if t != stop]))
    return texts
