"""A preallocated KV cache passed into the model's forward, shaped by the attention's cache spec."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from moemla.config import ModelConfig


def cache_spec(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Per-token, per-layer tensors the attention keeps: MHA caches K and V per head, MLA only C^K, C^V."""
    if cfg.attention == "mla":
        r = cfg.kv_lora_rank
        # Eq. 13: latents shared by the heads, C^K and C^V, or one joint C^KV (DeepSeek-V2 §2.1.2)
        spec = {"c_kv": (r,)} if cfg.latent == "joint" else {"c_k": (r,), "c_v": (r,)}
        if cfg.decoupled:  # DeepSeek-V2: one RoPE key shared by all heads, stored rotated beside the latents
            spec["k_pe"] = (cfg.rope_dim,)
        return spec
    return {"k": (cfg.n_heads, cfg.head_dim), "v": (cfg.n_heads, cfg.head_dim)}


class Write(NamedTuple):
    """Where one forward's T new tokens go in a cache: found once per forward, read by every layer."""

    cache: KVCache
    slots: torch.Tensor  # (T,) the slots written
    mask: torch.Tensor | None  # (B, T, span): the slots each new token reads (key_mask); None: causal alone
    span: int  # the forward reads slots 0..span-1


class KVCache:
    """Per-layer buffers (B, max_len, *spec) written in place at the device slot `pos`.

    Its one piece of state is where the next token goes, a device tensor (as gpt-fast's input_pos): a forward
    of T tokens writes slots pos..pos+T-1 and attends over every slot under a mask, reading no Python int, so
    eager, compiled and CUDA-graphed steps take one path. Whoever feeds tokens keeps count of them (TorchDecoder
    does) and checks the room; it may pass `filled` = its count after the forward, so that attention reads only
    those slots (a shape per call; a captured step needs the fixed default). Reading `length` costs a host sync
    on an accelerator.

    `pad` (one count per sequence) marks each sequence's first slots as left padding: prompts of
    different lengths share one batch, the attention never reads those slots, and learned positions
    count from each sequence's first real token (RoPE scores depend only on distances already).

    The inference code that owns a cache also chooses, on it, how the model decodes: `absorbed` (MLA steps
    over the latents, DeepSeek-V2's inference path, or through re-expanded K and V) and `gather_experts`
    (one-token steps copy each assignment's expert weights side by side instead of grouping tokens by expert,
    into reusable `scratch` buffers).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        batch_size: int,
        max_len: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        pad: Sequence[int] | None = None,
        absorbed: bool = True,
        gather_experts: bool = False,
    ) -> None:
        self.max_len = max_len or cfg.max_seq_len
        if self.max_len > cfg.max_seq_len:
            raise ValueError(f"cache max_len={self.max_len} exceeds the model's max_seq_len={cfg.max_seq_len}")
        self.batch_size = batch_size
        self.absorbed, self.gather_experts = absorbed, gather_experts
        self.scratch: dict[tuple[str, tuple[int, ...], torch.dtype], torch.Tensor] = {}
        self.pos = torch.zeros((), dtype=torch.long, device=device)  # the next slot to write
        self.pad = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,) left-padding slots per row
        self.rewind(pad)
        spec = cache_spec(cfg)
        self.layers: list[dict[str, torch.Tensor]] = [
            {
                name: torch.zeros(batch_size, self.max_len, *shape, dtype=dtype, device=device)
                for name, shape in spec.items()
            }
            for _ in range(cfg.n_layers)
        ]

    def rewind(self, pad: Sequence[int] | None = None) -> None:
        """Empty the cache for a new batch of prompts (the buffers stay: a captured step keeps reading them)."""
        counts = list(pad) if pad is not None else [0] * self.batch_size
        if len(counts) != self.batch_size or not all(0 <= n < self.max_len for n in counts):
            raise ValueError(f"pad needs {self.batch_size} counts in [0, {self.max_len}); got {counts}")
        self.pos.zero_()
        self.pad.copy_(torch.tensor(counts))
        self.padded = any(counts)  # a fact of this batch, known on the host

    @property
    def length(self) -> int:
        """Slots filled, left padding included. A host read of `pos`: a sync on an accelerator."""
        return int(self.pos)

    def write(self, t: int, filled: int | None = None) -> Write:
        """Where t new tokens go: slots pos..pos+t-1 (on the device), and which slots each of them reads.

        filled: pos + t, from a caller that counts its tokens (pos lives on the device). The forward then reads
        only the filled slots, and with nothing padded needs no mask: one new token reads every filled slot, and
        a first chunk (filled == t) is causal from slot 0."""
        if filled is not None and not t <= filled <= self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; {filled} requested")
        slots = self.pos + torch.arange(t, device=self.pos.device)  # (T,)
        if filled is not None and not self.padded and t in (1, filled):
            return Write(self, slots, None, filled)
        span = filled or self.max_len
        return Write(self, slots, self.key_mask(slots, span), span)

    def append(self, layer: int, at: Write, **new: torch.Tensor) -> dict[str, torch.Tensor]:
        """Write new entries (B, T, ...) at the write's slots; return the buffers of its span (B, span, ...)."""
        for name, value in new.items():
            self.layers[layer][name].index_copy_(1, at.slots, value)
        return {name: buf[:, : at.span] for name, buf in self.layers[layer].items()}

    def key_mask(self, slots: torch.Tensor, span: int) -> torch.Tensor:
        """(B, T, span): True where the query at slots[i] reads a key slot, written and not padding.

        A padding query reads itself alone: its row stays finite (never read), so no NaN enters the cache."""
        keys = torch.arange(span, device=slots.device)[None, None, :]  # (1, 1, S)
        queries = slots[None, :, None]  # (1, T, 1)
        real = keys >= self.pad[:, None, None]  # (B, 1, S)
        return (keys <= queries) & (real | (keys == queries))

    def positions(self, slots: torch.Tensor) -> torch.Tensor:
        """Learned-position ids (B, T) of `slots`, counted from each sequence's first real token."""
        return (slots[None, :] - self.pad[:, None]).clamp(min=0)

    def advance(self, n_tokens: int) -> None:
        self.pos.add_(n_tokens)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.values())

    @property
    def bytes_per_token(self) -> int:
        """Real bytes held per cached token (all layers), for one sequence of the batch."""
        return self.nbytes // (self.batch_size * self.max_len)


def cache_numel_per_token(cfg: ModelConfig) -> int:
    return cfg.n_layers * sum(math.prod(shape) for shape in cache_spec(cfg).values())
