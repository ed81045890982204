"""A preallocated KV cache passed into the model's forward, shaped by the attention's cache spec."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from moemla.config import ModelConfig


def cache_spec(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Per-token, per-layer tensors the attention keeps: MHA caches K and V per head, MLA only C^K, C^V."""
    if cfg.decoupled:  # DeepSeek-V2: one RoPE key shared by all heads, stored rotated beside the latents
        return {"c_k": (cfg.kv_lora_rank,), "c_v": (cfg.kv_lora_rank,), "k_pe": (cfg.rope_dim,)}
    if cfg.attention == "mla":
        return {"c_k": (cfg.kv_lora_rank,), "c_v": (cfg.kv_lora_rank,)}  # Eq. 13: shared latents
    return {"k": (cfg.n_heads, cfg.head_dim), "v": (cfg.n_heads, cfg.head_dim)}


class KVCache:
    """Per-layer buffers (B, max_len, *spec) written in place; `length` tokens are filled.

    `pad` (one count per sequence) marks each sequence's first slots as left padding: prompts of
    different lengths share one batch, the attention never reads those slots, and learned positions
    count from each sequence's first real token (RoPE scores depend only on distances already).
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
        static: bool = False,
    ) -> None:
        self.max_len = max_len or cfg.max_seq_len
        if self.max_len > cfg.max_seq_len:
            raise ValueError(f"cache max_len={self.max_len} exceeds the model's max_seq_len={cfg.max_seq_len}")
        self.batch_size = batch_size
        self.length = 0
        # MLA decode steps over the latents (absorbed, DeepSeek-V2's inference path) or through re-expanded
        # K and V (naive); a property of the cache, which inference code owns, not a flag on the model
        self.absorbed = absorbed
        # static: one-token steps keep every shape fixed (the write slot and the mask read a device tensor, the
        # attention spans all max_len slots) and read no Python int, so a step compiles once per shape and can be
        # captured once as a CUDA graph and replayed. Such a step advances only `pos`: whoever runs static steps
        # counts `length` outside them (TorchDecoder does), since a compiled step would guard on its value.
        self.static = static
        self.pos = torch.zeros((), dtype=torch.long, device=device)  # next slot to write, for static steps
        self.pad: torch.Tensor | None = None
        self.pad_counts = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,), read by static steps
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
        self.length = 0
        self.pos.zero_()
        counts = list(pad) if pad is not None else [0] * self.batch_size
        if len(counts) != self.batch_size or not all(0 <= n < self.max_len for n in counts):
            raise ValueError(f"pad needs {self.batch_size} counts in [0, {self.max_len}); got {counts}")
        self.pad_counts.copy_(torch.tensor(counts))
        self.pad = self.pad_counts if any(counts) else None

    def stepping(self, t: int) -> bool:
        """Whether a forward of t tokens is a static one-token step (fixed shapes, see `static`)."""
        return self.static and t == 1

    def append(self, layer: int, **new: torch.Tensor) -> dict[str, torch.Tensor]:
        """Write new entries (B, T, ...) after the filled prefix; return the filled prefix plus them.

        A static step writes at the device slot `pos` and returns every slot; the mask says which are filled.
        """
        if self.stepping(next(iter(new.values())).shape[1]):
            for name, value in new.items():
                self.layers[layer][name].index_copy_(1, self.pos.view(1), value)
            return dict(self.layers[layer])
        start = self.length
        out = {}
        for name, value in new.items():
            buf = self.layers[layer][name]
            end = start + value.shape[1]
            buf[:, start:end] = value
            out[name] = buf[:, :end]
        return out

    def start(self, t: int) -> int:
        """Where a chunk of t new tokens begins: `length`; 0 for a static step, which reads no Python int
        (its one query ignores where it starts: the mask says which slots it reads)."""
        return 0 if self.stepping(t) else self.length

    def key_mask(self, t: int) -> torch.Tensor | None:
        """(B, length + t): True at the slots that hold real tokens, after t new ones; None when nothing is padded.

        In a static step: (B, max_len), the filled slots (up to `pos`) that are not padding."""
        if self.stepping(t):
            slots = torch.arange(self.max_len, device=self.pos.device)
            return (slots[None, :] <= self.pos) & (slots[None, :] >= self.pad_counts[:, None])
        if self.pad is None:
            return None
        return torch.arange(self.length + t, device=self.pad.device)[None, :] >= self.pad[:, None]

    def positions(self, start: int, end: int, device: torch.device) -> torch.Tensor:
        """Position ids of slots start..end-1: (T,), or (B, T) counted from each sequence's first real token."""
        if self.stepping(end - start):
            return (self.pos - self.pad_counts).clamp(min=0)[:, None]  # (B, 1)
        slots = torch.arange(start, end, device=device)
        return slots if self.pad is None else (slots[None, :] - self.pad[:, None]).clamp(min=0)

    def advance(self, n_tokens: int) -> None:
        if self.stepping(n_tokens):
            self.pos.add_(1)  # `length` is the caller's to count (see `static`)
            return
        self.length += n_tokens
        self.pos.fill_(self.length)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.values())

    @property
    def bytes_per_token(self) -> int:
        """Real bytes held per cached token (all layers), for one sequence of the batch."""
        return self.nbytes // (self.batch_size * self.max_len)


def cache_numel_per_token(cfg: ModelConfig) -> int:
    return cfg.n_layers * sum(math.prod(shape) for shape in cache_spec(cfg).values())
