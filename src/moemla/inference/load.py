"""What to decode from: a run folder (its checkpoint, on any engine), an ONNX export folder (the ONNX engine) or a
GGUF export folder (llama.cpp); the engine follows from the folder. `moemla generate` and `moemla serve` open each
through here."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from moemla.config import ConfigError
from moemla.data.tokenizer import load_tokenizer
from moemla.device import resolve_device
from moemla.folders import TOKENIZER_FILE
from moemla.inference.decoder import Decoder, EngineName, Mode, Quantize, engine_device, make_decoder
from moemla.inference.llamacpp.engine import LlamaCppDecoder, is_gguf_folder
from moemla.inference.onnx.engine import OnnxDecoder, is_onnx_folder, refuse_export_flags


def open_decoder(
    path: str | Path,
    engine: EngineName | str = "auto",
    *,
    device: str = "auto",
    checkpoint: str | None = None,
    batch_size: int = 1,
    quantize: Quantize = "none",
    mode: Mode = "eager",
    compile: bool = False,
) -> tuple[Decoder, Tokenizer]:
    """The decoder and tokenizer of a run folder, an ONNX export folder or a GGUF export folder."""
    if is_gguf_folder(path):
        if engine not in ("auto", "llama.cpp"):
            raise ConfigError(f"{path} is a GGUF export: it decodes with --engine llama.cpp (or auto), not {engine}")
        refuse_export_flags(path, "gguf", device=device not in ("auto", "cpu"), checkpoint=checkpoint is not None,
                            quantize=quantize != "none", cuda_graph=mode != "eager", compile=compile)  # fmt: skip
        dec = LlamaCppDecoder(path, slots=batch_size)
        return dec, dec.tokenizer
    if engine == "llama.cpp":
        raise ConfigError(f"--engine llama.cpp runs a GGUF export folder; export this run first: moemla export {path} "
                          "OUT --format gguf (the DeepSeek flavor)")  # fmt: skip
    if is_onnx_folder(path):
        if engine not in ("auto", "onnx"):
            raise ConfigError(f"{path} is an ONNX export: it decodes with --engine onnx (or auto), not {engine}")
        refuse_export_flags(path, device=device not in ("auto", "cpu"), checkpoint=checkpoint is not None,
                            quantize=quantize != "none", cuda_graph=mode != "eager", compile=compile)  # fmt: skip
        return OnnxDecoder(path), load_tokenizer(Path(path) / TOKENIZER_FILE)
    if engine == "onnx":
        raise ConfigError(
            f"--engine onnx runs an ONNX export folder; export this run first: moemla export {path} OUT --format onnx"
        )
    from moemla.runs import RunFolder

    run = RunFolder.open(path)
    model = run.load_model(resolve_device(engine_device(engine, device)), checkpoint)
    dec = make_decoder(model, engine, batch_size=batch_size, quantize=quantize, mode=mode, compile=compile)  # type: ignore[arg-type]
    return dec, run.tokenizer()
