"""One Decoder interface for every engine: prefill a left-padded batch, then one token per sequence per step.

Implemented by TorchDecoder (inference/torch_decoder.py: the Transformer and its KVCache), the torch-free CPU
engine (inference/cpu: numpy or numba kernels, fp32 or int8 weights), and the engines of export folders (ONNX
Runtime, inference/onnx; llama.cpp, inference/llamacpp). This module holds the interface and the factory that
picks an engine (make_decoder); generate, bench, serve, the CLI's --engine and reproduce reach a model only
through them.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, Protocol

import torch

from moemla.config import CPU_PORTABLE, ConfigError, ModelConfig, QuantizeKind, portable
from moemla.inference.torch_decoder import Mode, TorchDecoder
from moemla.model import Transformer

EngineName = Literal["torch", "numpy", "numba", "onnx", "llama.cpp"]
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
    engine: EngineName | Literal["auto"] = "torch",
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
