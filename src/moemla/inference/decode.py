"""The one decode loop: a batch of rows in, per-step events out (a sampled token with its log-probability, or a
row's finish and why). `generate_ids`, batched generation, the server's engine and, through them, the judge and
`reproduce` all consume it; a batch of one is just a batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from moemla.inference.decoder import Decoder
from moemla.inference.sampling import SamplingConfig, sample


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
    """One sequence to continue: its prompt, sampling settings (budget and seed included), and how many top
    alternatives to report per token (None: no log-probabilities at all, the cheapest)."""

    prompt: list[int]
    sampling: SamplingConfig
    logprobs: int | None = None
    budget: int | None = None  # tokens to generate when not sampling.max_new_tokens (0: none, score only)

    @property
    def max_new(self) -> int:
        return self.sampling.max_new_tokens if self.budget is None else self.budget


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
    longest = max(len(r.prompt) for r in rows)
    max_len = min(dec.cfg.max_seq_len, longest + max(r.max_new for r in rows))
    logits = dec.prefill([r.prompt for r in rows], max_len)  # (B, V)
    generators = [torch.Generator(device=logits.device).manual_seed(r.sampling.seed) for r in rows]
    made, done = [0] * len(rows), [False] * len(rows)
    for i, row in enumerate(rows):
        if row.max_new == 0:
            done[i] = True
            yield i, Finish("length")
    while not all(done):
        step = []
        for i, row in enumerate(rows):
            if not done[i] and cancelled is not None and cancelled(i):
                done[i] = True
                yield i, Finish("cancelled")
            if done[i]:
                step.append(stop or 0)  # a finished row still fills its slot of the step; nobody reads it
                continue
            token, event = _sample(logits[i : i + 1], row, generators[i])
            yield i, event
            made[i] += 1
            step.append(token)
            if token == stop or made[i] == row.max_new:
                done[i] = True
                yield i, Finish("stop" if token == stop else "length")
        if all(done):
            return
        if dec.length == max_len:  # the context (or the longest budget) is full
            for i in range(len(rows)):
                if not done[i]:
                    done[i] = True
                    yield i, Finish("length")
            return
        logits = dec.step(step)  # (B, V): one decode step


def _sample(logits: torch.Tensor, row: Row, generator: torch.Generator) -> tuple[int, Token]:
    s = row.sampling
    token = int(sample(logits, s.temperature, s.top_k, s.top_p, generator))
    if row.logprobs is None:
        return token, Token(token, None)
    lp = logits[0].float().log_softmax(-1)
    return token, Token(token, float(lp[token]), top_logprobs(lp, row.logprobs))
