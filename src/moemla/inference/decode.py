"""The one decode loop: a batch of rows in, per-step events out (a sampled token with its log-probability, or a
row's finish and why). `generate_ids`, batched generation, the server's engine and, through them, the judge and
`reproduce` all consume it; a batch of one is just a batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from moemla.inference.decoder import Decoder
from moemla.inference.sampling import SamplingConfig, fit, sample_batch


@dataclass
class Token:
    """One token of a row: a prompt token (echo) or a sampled one, with its log-probability and top alternatives."""

    id: int
    logprob: float | None  # None for the first prompt token, which nothing predicts, and when not asked for
    top: list[tuple[int, float]] = field(default_factory=list)
    prompt: bool = False


@dataclass
class Finish:
    reason: str  # stop (end of text or a stop string), length (budget or context), cancelled, error
    error: str | None = None


Event = Token | Finish


@dataclass(frozen=True)
class Row:
    """One sequence to continue: its prompt, its sampling settings (the token budget and seed included; a budget
    of 0 generates nothing), and how many top alternatives to report per token (None: no log-probabilities at
    all, the cheapest; 0: only the chosen token's)."""

    prompt: list[int]
    sampling: SamplingConfig
    logprobs: int | None = None


def top_logprobs(logprobs: torch.Tensor, n: int | None) -> list[tuple[int, float]]:
    if not n:
        return []
    values, ids = logprobs.topk(n)
    return list(zip(ids.tolist(), values.tolist(), strict=True))


@torch.no_grad()
def decode(
    dec: Decoder, rows: list[Row], stop: int | None, cancelled: Callable[[int], bool] | None = None
) -> Iterator[tuple[int, Event]]:
    """(row, Token) for each sampled token and (row, Finish) once per row: at `stop`, at its budget, when the
    context is full, or when `cancelled(row)` says so. Rows are left-padded into one prefill and one step each."""
    context = dec.cfg.max_seq_len
    budget = [fit(len(r.prompt), context, r.sampling.max_new_tokens) for r in rows]
    max_len = min(context, max(len(r.prompt) for r in rows) + max(budget))
    logits = dec.prefill([r.prompt for r in rows], max_len)  # (B, V)
    generators = [torch.Generator(device=logits.device).manual_seed(r.sampling.seed) for r in rows]
    made, done = [0] * len(rows), [False] * len(rows)
    for i in range(len(rows)):
        if budget[i] == 0:
            done[i] = True
            yield i, Finish("length")
    while not all(done):
        for i in range(len(rows)):
            if not done[i] and cancelled is not None and cancelled(i):
                done[i] = True
                yield i, Finish("cancelled")
        live = [i for i in range(len(rows)) if not done[i]]
        if not live:
            return
        tokens = _draw(logits, rows, generators, live)
        step = [stop or 0] * len(rows)  # a finished row still fills its slot of the step; nobody reads it
        for i, event in zip(live, tokens, strict=True):
            yield i, event
            made[i] += 1
            step[i] = event.id
            if event.id == stop or made[i] == budget[i]:
                done[i] = True
                yield i, Finish("stop" if event.id == stop else "length")
        if all(done):
            return
        if dec.length == max_len:  # the context (or the longest budget) is full
            for i in range(len(rows)):
                if not done[i]:
                    done[i] = True
                    yield i, Finish("length")
            return
        logits = dec.step(step)  # (B, V): one decode step


def _draw(logits: torch.Tensor, rows: list[Row], generators: list[torch.Generator], live: list[int]) -> list[Token]:
    """The live rows' next tokens, sampled in one batch on the logits' device, read back in one transfer; the
    log-probabilities only of rows that asked for them."""
    index = torch.tensor(live, device=logits.device) if len(live) < len(rows) else None
    part = logits if index is None else logits.index_select(0, index)  # (L, V)
    ids = sample_batch(part, [rows[i].sampling for i in live], [generators[i] for i in live]).tolist()
    tokens = [Token(t, None) for t in ids]
    scored = [j for j, i in enumerate(live) if rows[i].logprobs is not None]
    if scored:
        lp = part[scored].float().log_softmax(-1)  # (S, V)
        chosen = lp.gather(-1, torch.tensor([[ids[j]] for j in scored], device=lp.device)).squeeze(-1).tolist()
        for n, j in enumerate(scored):
            tokens[j] = Token(ids[j], chosen[n], top_logprobs(lp[n], rows[live[j]].logprobs))
    return tokens
