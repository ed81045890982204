"""One Decoder interface for every engine: prefill a left-padded batch, then one token per sequence per step.

Implemented by TorchDecoder (the Transformer and its KVCache: eager or torch.compile; absorbed or naive MLA
decode chosen here, not on the model) and by the torch-free CPU engine (inference/cpu: numpy or numba kernels,
fp32 or int8 weights). generate, bench, serve, the CLI's --engine and reproduce reach a model only through it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from moemla.config import ConfigError, ModelConfig
from moemla.model import KVCache, Transformer

Engine = Literal["torch", "numpy", "numba"]
Mode = Literal["eager", "compile"]
Quantize = Literal["none", "int8"]


class Decoder(Protocol):
    """prefill -> logits (B, V) of each prompt's last token; step(tokens (B,)) -> logits (B, V); reset."""

    cfg: ModelConfig
    max_batch: int | None  # None: any batch size

    @property
    def length(self) -> int: ...  # cache slots filled, left padding included

    @property
    def max_len(self) -> int: ...  # slots the cache holds

    def prefill(self, prompts: Sequence[Sequence[int]], max_len: int | None = None) -> torch.Tensor | np.ndarray: ...

    def step(self, tokens: Sequence[int]) -> torch.Tensor | np.ndarray: ...

    def reset(self) -> None: ...


def lm_head(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """h (B, C) @ weight (V, C)^T, in the kernel layout that streams the weight fastest on this device."""
    if h.device.type != "cpu":
        return F.linear(h, weight)
    # NOTE: measured on CPU (torch 2.13, oneDNN/MKL): x @ W^T for a few rows reads W at ~8 GB/s, W @ x^T with
    # two or more columns at ~25 GB/s (one column takes a slow matrix-vector path, so it is duplicated). The LM
    # head is the largest matrix a small model reads per token.
    x = h if h.shape[0] > 1 else h.repeat(2, 1)
    return (weight @ x.T).T[: h.shape[0]]


def left_pad(prompts: Sequence[Sequence[int]]) -> tuple[list[list[int]], list[int]]:
    """Prompts padded on the left to the longest (with token 0, never attended to) and each one's pad count."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("give one or more non-empty prompts")
    longest = max(len(p) for p in prompts)
    pad = [longest - len(p) for p in prompts]
    return [[0] * n + list(p) for n, p in zip(pad, prompts, strict=True)], pad


class TorchDecoder:
    """The Transformer behind the Decoder interface, on any device and dtype, with its preallocated KVCache."""

    max_batch = None

    def __init__(self, model: Transformer, *, absorbed: bool = True, mode: Mode = "eager") -> None:
        self.model, self.cfg, self.absorbed = model.eval(), model.cfg, absorbed
        self.param = next(model.parameters())
        self.device = self.param.device
        self.cache: KVCache | None = None
        # dynamic shapes: the cache grows every step, and one graph per length would recompile each time
        self._hidden = torch.compile(model.hidden, dynamic=True) if mode == "compile" else model.hidden

    @property
    def length(self) -> int:
        return 0 if self.cache is None else self.cache.length

    @property
    def max_len(self) -> int:
        return self.cfg.max_seq_len if self.cache is None else self.cache.max_len

    @torch.no_grad()
    def prefill(self, prompts: Sequence[Sequence[int]], max_len: int | None = None) -> torch.Tensor:
        rows, pad = left_pad(prompts)
        size = min(self.cfg.max_seq_len, max_len or self.cfg.max_seq_len)
        self.cache = KVCache(self.cfg, len(rows), max_len=size, dtype=self.param.dtype, device=self.device, pad=pad,
                             absorbed=self.absorbed)  # fmt: skip
        return self._logits(torch.tensor(rows, device=self.device))

    @torch.no_grad()
    def step(self, tokens: Sequence[int]) -> torch.Tensor:
        if self.cache is None:
            raise ValueError("step before prefill: prefill the prompts first")
        return self._logits(torch.as_tensor(tokens, device=self.device).view(-1, 1))

    def reset(self) -> None:
        self.cache = None

    def _logits(self, ids: torch.Tensor) -> torch.Tensor:
        h = self._hidden(ids, self.cache)  # (B, T, C)
        return lm_head(h[:, -1], self.model.wte.weight)  # (B, V): only the last position is sampled from


def make_decoder(
    model: Transformer,
    engine: Engine | Literal["auto"] = "torch",
    *,
    batch_size: int = 1,
    quantize: Quantize = "none",
    absorbed: bool = True,
    mode: Mode = "eager",
) -> Decoder:
    """The decoder for an engine; "auto": the numba CPU engine for one sequence on a CPU, else torch."""
    if engine == "auto":
        one_on_cpu = model.wte.weight.device.type == "cpu" and batch_size == 1
        engine = ("numba" if importlib.util.find_spec("numba") else "numpy") if one_on_cpu else "torch"
    if engine == "torch":
        if quantize != "none":
            raise ConfigError("--quantize int8 is for the CPU engine; use --engine numba or numpy")
        return TorchDecoder(model, absorbed=absorbed, mode=mode)
    if batch_size > 1:
        raise ConfigError(f"--engine {engine} decodes one sequence at a time; use --engine torch for --batch-size")
    from moemla.inference.cpu.decoder import NumpyDecoder

    return NumpyDecoder.from_model(model, compiled=engine == "numba", quantize=quantize)
