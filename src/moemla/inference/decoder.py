"""One Decoder interface for every engine: prefill a left-padded batch, then one token per sequence per step.

Implemented by TorchDecoder (the Transformer and its KVCache: eager, static, compiled or a captured CUDA
graph; absorbed or naive MLA decode chosen here, not on the model) and by the torch-free CPU engine
(inference/cpu: numpy or numba kernels, fp32 or int8 weights). generate, bench, serve, the CLI's --engine and
reproduce reach a model only through it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal, Protocol

import torch
import torch.nn.functional as F

from moemla.compiling import CompiledOrEager
from moemla.config import CPU_PORTABLE, ConfigError, ModelConfig, QuantizeKind, portable
from moemla.inference.padding import left_pad
from moemla.model import KVCache, Transformer

Engine = Literal["torch", "numpy", "numba", "onnx", "llama.cpp"]
Mode = Literal["eager", "static", "cuda-graph"]
Quantize = QuantizeKind  # int4: the ONNX engine only


class Decoder(Protocol):
    """prefill -> logits (B, V) of each prompt's last token; step(tokens (B,)) -> logits (B, V); reset.

    Every engine returns torch tensors (the CPU engine's wrap its numpy arrays without a copy), so no caller
    converts results or branches on the engine."""

    cfg: ModelConfig
    max_batch: int | None  # None: any batch size

    @property
    def length(self) -> int: ...  # cache slots filled, left padding included

    @property
    def max_len(self) -> int: ...  # slots the cache holds

    @property
    def cache_nbytes(self) -> int: ...  # bytes of the KV cache at its current size

    @property
    def weight_nbytes(self) -> int: ...  # bytes of the weights this decoder holds, in its own layout

    def prefill(self, prompts: Sequence[Sequence[int]], max_len: int | None = None) -> torch.Tensor: ...

    def step(self, tokens: Sequence[int]) -> torch.Tensor: ...

    def reset(self) -> None: ...

    def logits(self, ids: Sequence[int]) -> torch.Tensor: ...  # (T, V) of every position of one sequence; resets


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


CPU_ENGINES = ("numpy", "numba")


def onnx_decoder(model: Transformer, quantize: Quantize) -> Decoder:
    """The model exported on the fly to a temporary ONNX folder (removed with the decoder), decoded by onnxruntime:
    what `moemla bench --engine onnx` measures."""
    import tempfile

    from moemla.inference.onnx.engine import OnnxDecoder
    from moemla.inference.onnx.write import write_onnx

    folder = tempfile.TemporaryDirectory(prefix="moemla-onnx-")
    write_onnx(model, Path(folder.name) / "model", quantize=quantize)
    dec = OnnxDecoder(Path(folder.name) / "model")
    dec.folder_handle = folder  # the folder lives as long as the decoder
    return dec


def engine_device(engine: str, device: str) -> str:
    """The device to load a model on for an engine: "auto" is the CPU for the CPU engines (make_decoder refuses
    any other device for them)."""
    return "cpu" if engine in CPU_ENGINES and device == "auto" else device


def check_engine(
    engine: str, device: torch.device, dtype: torch.dtype, batch_size: int, absorbed: bool = True,
    torch_only: bool = False,
) -> None:  # fmt: skip
    """The one check of what an engine runs (the torch-free CPU engines: one float32 sequence on the CPU,
    absorbed); make_decoder calls it, and `bench` before it builds any model."""
    if engine == "llama.cpp":
        if device.type != "cpu" or torch_only or not absorbed or dtype not in (torch.float32, torch.float16):
            raise ConfigError(
                "--engine llama.cpp runs a GGUF file on the CPU (f32, f16, or --quantize int8 / int4 "
                "as q8_0 / q4_0): drop --device, --naive, --compile, --cuda-graph and --dtype bf16"
            )
        return
    if engine == "onnx":
        if device.type != "cpu" or torch_only or not absorbed:
            raise ConfigError("--engine onnx runs an ONNX export on the CPU: drop --device, --naive, --compile and "
                              "--cuda-graph")  # fmt: skip
        return
    if engine not in CPU_ENGINES:
        return
    if device.type != "cpu":
        raise ConfigError(f"--engine {engine} runs on the CPU; drop --device {device} or use --engine torch")
    if dtype != torch.float32:
        raise ConfigError(f"--engine {engine} decodes in float32; drop --dtype or use --engine torch")
    if batch_size > 1:
        raise ConfigError(f"--engine {engine} decodes one sequence at a time; use --engine torch for a batch")
    if torch_only or not absorbed:
        raise ConfigError(
            f"--naive, --compile and --cuda-graph apply to the torch engine's step; drop them with --engine {engine}"
        )


def make_decoder(
    model: Transformer,
    engine: Engine | Literal["auto"] = "torch",
    *,
    batch_size: int = 1,
    quantize: Quantize = "none",
    absorbed: bool = True,
    mode: Mode = "eager",
    compile: bool = False,
) -> Decoder:
    """The decoder for an engine; "auto": the numba CPU engine for one sequence on a CPU, else torch (and torch
    whenever a torch mode or compile is asked for, or the model has a field the CPU engine does not implement)."""
    torch_only = compile or mode != "eager"
    if engine == "auto":
        cpu_engine_runs = not torch_only and portable(model.cfg, CPU_PORTABLE)
        one_on_cpu = model.wte.weight.device.type == "cpu" and batch_size == 1 and cpu_engine_runs
        engine = ("numba" if importlib.util.find_spec("numba") else "numpy") if one_on_cpu else "torch"
    if engine == "torch":
        if quantize != "none":
            raise ConfigError("--quantize int8 is for the CPU engine; use --engine numba or numpy")
        return TorchDecoder(model, absorbed=absorbed, mode=mode, compile=compile)
    if engine == "llama.cpp":
        raise ConfigError("--engine llama.cpp runs a GGUF export folder: moemla export RUN OUT --format gguf, then "
                          "moemla generate OUT")  # fmt: skip
    if engine == "onnx":
        check_engine(engine, model.wte.weight.device, model.wte.weight.dtype, batch_size, absorbed, torch_only)
        return onnx_decoder(model, quantize)
    if quantize == "int4":
        raise ConfigError("--quantize int4 is for --engine onnx (MatMulNBits); the CPU engine takes int8")
    check_engine(engine, model.wte.weight.device, model.wte.weight.dtype, batch_size, absorbed, torch_only)
    from moemla.inference.cpu.decoder import NumpyDecoder

    return NumpyDecoder.from_model(model, compiled=engine == "numba", quantize=quantize)
