"""The torch model behind the Decoder interface: TorchDecoder on any device and dtype, its preallocated KVCache,
absorbed or naive MLA decode (chosen here, not on the model), and its modes: eager, static, compiled, or a
captured CUDA graph per batch and length bucket."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from moemla.compiling import CompiledOrEager
from moemla.config import ConfigError, ModelConfig
from moemla.inference.padding import left_pad
from moemla.model import KVCache, Transformer

Mode = Literal["eager", "static", "cuda-graph"]


def lm_head(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """h (B, C) @ weight (V, C)^T, in the kernel layout that streams the weight fastest on this device."""
    if h.device.type != "cpu":
        return F.linear(h, weight)
    # NOTE: measured on CPU (torch 2.13, oneDNN/MKL): x @ W^T for a few rows reads W at ~8 GB/s, W @ x^T with
    # two or more columns at ~25 GB/s (one column takes a slow matrix-vector path, so it is duplicated). The LM
    # head is the largest matrix a small model reads per token.
    x = h if h.shape[0] > 1 else h.repeat(2, 1)
    return (weight @ x.T).T[: h.shape[0]]


def bucket(n: int, floor: int = 1) -> int:
    """The power of two >= n (and >= floor): batch and cache sizes share a few shapes, so a few captured graphs."""
    return max(floor, 1 << max(0, n - 1).bit_length())


class TorchDecoder:
    """The Transformer behind the Decoder interface, on any device and dtype, with its preallocated KVCache.

    Every mode runs the same forward (the cache writes at a device slot and reads no Python int); they differ in
    what is reused and launched. mode: eager (a cache sized to each request); static (one cache reused per batch
    and length bucket, so a step has a few fixed shapes: what a CUDA graph captures, checkable on a CPU);
    cuda-graph (the static step captured once per bucket and replayed: one launch per token instead of hundreds).
    compile: torch.compile the one-token step, once per bucket (fixed shapes, no graph break), fusing its small
    kernels; implies static steps, and combines with cuda-graph (the compiled step is what is captured).
    Prefill stays eager: one call per request, of any length.

    This decoder, not the model, chooses how the model decodes, on each cache: `absorbed` MLA steps, and
    `gather_experts` (gather_experts below) for one-token MoE steps.
    """

    max_batch = None

    def __init__(
        self, model: Transformer, *, absorbed: bool = True, mode: Mode = "eager", compile: bool = False
    ) -> None:
        self.model, self.cfg, self.absorbed, self.mode = model.eval(), model.cfg, absorbed, mode
        self.param = next(model.parameters())
        self.device = self.param.device
        if mode == "cuda-graph" and self.device.type != "cuda":
            raise ConfigError("CUDA-graph decoding needs the model on a CUDA device; use mode eager or static")
        self.static = mode != "eager" or compile
        # a captured step cannot hold a host sync; a compiled bf16 step's grouped experts have none
        self.captured = mode == "cuda-graph" and not (compile and self.param.dtype == torch.bfloat16)
        self.cache: KVCache | None = None
        self.rows = 0  # real sequences in the batch (a static bucket may hold more)
        self._length = 0  # slots filled: counted here, so no step reads the cache's device slot back
        self._static: dict[tuple[int, int], KVCache] = {}  # bucket -> its reused cache
        self._graphs: dict[tuple[int, int], _CapturedStep] = {}
        self._step: Callable[..., torch.Tensor] = _last_logits
        if compile:
            then = "decoding continues with the uncompiled step (drop --compile to skip the attempt)"
            self._step = CompiledOrEager(_last_logits, then=then, recompile_limit=64, fullgraph=True, dynamic=False)

    @property
    def length(self) -> int:
        return self._length

    @property
    def cache_nbytes(self) -> int:
        return 0 if self.cache is None else self.cache.nbytes

    @property
    def weight_nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    @property
    def max_len(self) -> int:
        return self.cfg.max_seq_len if self.cache is None else self.cache.max_len

    def _new_cache(self, rows: int, size: int, pad: Sequence[int] | None = None) -> KVCache:
        gather = gather_experts(self.cfg, rows, self.captured)
        return KVCache(self.cfg, rows, max_len=size, dtype=self.param.dtype, device=self.device, pad=pad,
                       absorbed=self.absorbed, gather_experts=gather)  # fmt: skip

    @torch.no_grad()
    def prefill(self, prompts: Sequence[Sequence[int]], max_len: int | None = None) -> torch.Tensor:
        size = min(self.cfg.max_seq_len, max_len or self.cfg.max_seq_len)
        self.rows = len(prompts)
        if self.static:  # a bucket's cache, filled with dummy one-token rows
            key = (bucket(len(prompts)), min(self.cfg.max_seq_len, bucket(size, 64)))
            rows, pad = left_pad([*prompts, *[[0]] * (key[0] - len(prompts))])
            if key not in self._static:
                self._static[key] = self._new_cache(*key)
            self.cache = self._static[key]
            self.cache.rewind(pad)
        else:
            rows, pad = left_pad(prompts)
            self.cache = self._new_cache(len(rows), size, pad)
        filled = None if self.static else len(rows[0])
        logits = _last_logits(self.model, torch.tensor(rows, device=self.device), self.cache, filled)[: self.rows]
        self._length = len(rows[0])
        return logits

    @torch.no_grad()
    def step(self, tokens: Sequence[int]) -> torch.Tensor:
        cache = self.cache
        if cache is None:
            raise ValueError("step before prefill: prefill the prompts first")
        if self._length >= cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} tokens; {self._length + 1} requested")
        ids = torch.as_tensor(tokens, device=self.device).view(-1, 1)  # (B, 1)
        if self.rows < cache.batch_size:  # a static bucket's dummy rows step on token 0
            ids = torch.cat([ids, ids.new_zeros(cache.batch_size - self.rows, 1)])
        if self.mode == "cuda-graph":
            key = (cache.batch_size, cache.max_len)
            if key not in self._graphs:
                self._graphs[key] = _CapturedStep(lambda x: self._step(self.model, x, cache), cache, ids)
            logits = self._graphs[key].replay(ids)
        else:  # an eager step reads only the filled slots; a static one reads all (fixed shapes)
            logits = self._step(self.model, ids, cache, None if self.static else self._length + 1)
        self._length += 1
        return logits[: self.rows]

    def reset(self) -> None:
        self.cache, self._length = None, 0

    @torch.no_grad()
    def logits(self, ids: Sequence[int]) -> torch.Tensor:
        """Logits (T, V) of every position of one sequence, without a cache (scoring a prompt)."""
        self.reset()
        return self.model(torch.tensor([list(ids)], device=self.device))[0][0]


def gather_experts(cfg: ModelConfig, batch: int, captured: bool) -> bool:
    """Whether one-token MoE steps gather each assignment's expert weights (RoutedExperts.forward_gathered)
    instead of grouping tokens by expert: when a step routes fewer assignments than there are experts, and
    always in a captured step, which cannot hold the grouped path's host sync (`captured`)."""
    if cfg.ffn != "moe":
        return False
    return captured or batch * cfg.n_activated_experts < cfg.n_routed_experts


def _last_logits(model: Transformer, ids: torch.Tensor, cache: KVCache, filled: int | None = None) -> torch.Tensor:
    """ids (B, T) appended to the cache -> logits (B, V) of each row's last token, the only one sampled from.
    A prefill (any T) or a one-token step (T = 1, what compile and CUDA graphs take)."""
    return lm_head(model.hidden(ids, cache, filled)[:, -1], model.wte.weight)


class _CapturedStep:
    """One static decode step (B tokens in, (B, V) logits out) captured as a CUDA graph over a static cache."""

    def __init__(self, step: Callable[[torch.Tensor], torch.Tensor], cache: KVCache, ids: torch.Tensor) -> None:
        self.ids = ids.clone()
        pos = cache.pos.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph: allocator pools, cuBLAS handles, compiling
            for _ in range(2):
                step(self.ids)  # writes the slot the real step will overwrite; then undo its advance
                cache.pos.copy_(pos)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph):
                self.out = step(self.ids)  # writes slot `pos`, then pos += 1, on every replay
        except RuntimeError as err:  # e.g. a step that reads the device from the host, which no graph can hold
            first = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
            raise ConfigError(
                f"capturing the decode step as a CUDA graph failed ({first}); decode without --cuda-graph, or in "
                "bfloat16, where every step runs without host syncs"
            ) from None

    def replay(self, ids: torch.Tensor) -> torch.Tensor:
        self.ids.copy_(ids)
        self.graph.replay()
        return self.out.clone()
