"""Sampling next tokens from logits (temperature, top-k, top-p), SamplingConfig (its defaults and checks), and the
one rule for how a prompt fits the model's context."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from moemla.config import doc


@dataclass(frozen=True)
class SamplingConfig:
    """The one home of sampling defaults and their checks: `generate`, the CLI flags, the server's requests, the
    judge's samples, lm-eval's requests and an export's generation_config.json and manifest all derive from it."""

    temperature: float = doc(0.8, "sampling temperature; 0 is greedy")
    top_k: int | None = doc(40, "sample among the k most likely tokens; none for no limit")
    top_p: float | None = doc(None, "sample within the nucleus of probability p; none (or 1) for no cut")
    max_new_tokens: int = doc(200, "tokens to generate at most (0: none, the prompt is only scored)")
    seed: int = doc(0, "sampling seed (prompt i uses seed + i)")

    def __post_init__(self) -> None:
        # ValueError naming the flag: the CLI reports it as it is, the server as a 400
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"--temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"--top-k must be at least 1 (or none for no limit), got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1] (1 = no nucleus cut), got {self.top_p}")
        if self.max_new_tokens < 0:
            raise ValueError(f"--max-new-tokens must be at least 0, got {self.max_new_tokens}")
        if not 0 <= self.seed < 2**63:  # a torch.Generator seed; the server's seeds are offset from it
            raise ValueError(f"--seed must be in [0, 2^63), got {self.seed}")

    def replace(self, **changes: object) -> SamplingConfig:
        return dataclasses.replace(self, **changes)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def describe(self) -> str:
        """'greedy', or the settings that shape the draw, e.g. 'temperature 0.8, top-k 40'."""
        if self.greedy:
            return "greedy"
        parts = [f"temperature {self.temperature:g}"]
        parts += [f"top-k {self.top_k}"] if self.top_k is not None else []
        parts += [f"top-p {self.top_p:g}"] if self.top_p is not None and self.top_p < 1 else []
        return ", ".join(parts)

    def generation_config(self) -> dict[str, object]:
        """The same defaults as a Hugging Face generation_config.json, so `model.generate(**inputs)` samples as
        `moemla generate` does."""
        out: dict[str, object] = {"do_sample": not self.greedy, "max_new_tokens": self.max_new_tokens}
        if not self.greedy:
            out["temperature"] = self.temperature
            out |= {"top_k": self.top_k} if self.top_k is not None else {}
            out |= {"top_p": self.top_p} if self.top_p is not None else {}
        return out


def greedy(max_new_tokens: int = SamplingConfig.max_new_tokens) -> SamplingConfig:
    """Greedy decoding of up to max_new_tokens tokens (the other fields at their defaults)."""
    return SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens)


class PromptTooLong(ValueError):
    """A prompt that leaves the model's context no room."""


def fit(prompt_len: int, context: int, max_new: int) -> int:
    """Tokens that may follow a prompt of prompt_len tokens: max_new, cut to what the context leaves.

    The one check of every entry point (generate, the samples, lm-eval, the server, every engine): a prompt must
    leave room for one new token, or (max_new 0, scoring only) fit the context itself."""
    if prompt_len < 1:
        raise ValueError("the prompt is empty; give a non-empty prompt (at least one token)")
    if prompt_len > context or (max_new > 0 and prompt_len == context):
        raise PromptTooLong(
            f"the prompt has {prompt_len} tokens but the model's context is {context} tokens; shorten the prompt"
        )
    return min(max_new, context - prompt_len)


def truncate_prompt(prompt: Sequence[int], context: int, max_new: int) -> list[int]:
    """The prompt's end, cut so that min(max_new, context // 2) tokens may follow: a long prompt keeps at least
    half of the context, a short one is left whole."""
    keep = context - min(max_new, context // 2)
    return list(prompt[-keep:]) if len(prompt) > keep else list(prompt)


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """logits (B, V) with everything outside the top-k and outside the top-p nucleus set to -inf."""
    configs = [SamplingConfig(1.0, top_k, top_p)] * logits.shape[0]
    values, order = _candidates(logits.float(), configs)
    out = torch.full_like(logits, float("-inf"))
    return out.scatter(-1, order, values.to(logits.dtype))


def _candidates(logits: torch.Tensor, configs: Sequence[SamplingConfig]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's candidates, most likely first: values (B, N) with the ones outside the row's top-k or top-p
    at -inf, and their token ids (B, N). N is the largest top-k when every row has one, else the vocabulary."""
    ks = [c.top_k for c in configs]
    vocab = logits.shape[-1]
    n = vocab if None in ks else min(vocab, max(ks))  # type: ignore[type-var]
    values, order = _most_likely(logits, n)  # (B, N)
    rank = torch.arange(n, device=logits.device)
    k = torch.tensor([min(x or vocab, n) for x in ks], device=logits.device)
    values = values.masked_fill(rank >= k[:, None], float("-inf"))
    ps = [c.top_p for c in configs]
    if any(p is not None and p < 1 for p in ps):
        probs = values.softmax(-1)
        top_p = torch.tensor([p if p is not None else 1.0 for p in ps], device=logits.device)
        # drop a token when the tokens before it already cover top_p; the most likely token always stays
        before = probs.cumsum(-1) - probs
        values = values.masked_fill((before >= top_p[:, None]) & (top_p[:, None] < 1), float("-inf"))
    return values, order


def _most_likely(logits: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The n largest logits of each row and their ids, most likely first, equal logits by token id (as numpy's and
    the browser page's sort), so which of equal logits falls inside a top-p nucleus is defined. With the whole
    vocabulary that is one stable sort; under a top-k, topk's n (cheap) re-sorted. Which of several equal logits
    straddling the top-k cut stays is topk's choice (deciding it would cost a full sort or a host sync)."""
    if n == logits.shape[-1]:
        return torch.sort(logits, dim=-1, descending=True, stable=True)
    values, order = torch.topk(logits, n, dim=-1)
    order, by_id = order.sort(dim=-1)
    values, by_value = values.gather(-1, by_id).sort(dim=-1, descending=True, stable=True)
    return values, order.gather(-1, by_value)


def sample_batch(
    logits: torch.Tensor, configs: Sequence[SamplingConfig], generators: Sequence[torch.Generator]
) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V), row i with configs[i] and its own generators[i], all in one batch
    on the logits' device (no host sync). Row i draws the same token alone or in a batch: each row takes one
    uniform number from its own generator and inverts its own distribution's CDF."""
    if all(c.greedy for c in configs):
        if logits.device.type == "cpu":  # NOTE: numpy's argmax over 50K logits takes ~4 us, torch's ~45 us here
            return torch.from_numpy(logits.float().numpy().argmax(-1))
        return logits.argmax(-1)
    temperature = torch.tensor([c.temperature or 1.0 for c in configs], device=logits.device)
    values, order = _candidates(logits.float() / temperature[:, None], configs)  # (B, N)
    cdf = values.softmax(-1).cumsum(-1)  # (B, N)
    u = torch.stack([torch.rand((), generator=g, device=logits.device) for g in generators])  # (B,)
    pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp_max(cdf.shape[-1] - 1)  # (B, 1)
    drawn = order.gather(-1, pick).squeeze(-1)  # (B,)
    is_greedy = torch.tensor([c.greedy for c in configs], device=logits.device)
    return torch.where(is_greedy, logits.argmax(-1), drawn)


def sample(logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V), every row with the same settings and generator."""
    return sample_batch(logits, [sampling] * logits.shape[0], [generator] * logits.shape[0])
