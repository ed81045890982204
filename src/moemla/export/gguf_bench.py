"""`moemla bench --engine llama.cpp`: llama.cpp's own decode loop on the same random weights, in bench's table (here,
beside the GGUF export it needs, not in inference/, which may not import export/).

The weights go through the GGUF export (export/gguf.py) into a temporary folder; llama.cpp then prefills the
batch's prompts and decodes greedily in its own loop (its sampler, its batching of the rows, its f16 cache: what
`llama-cli` and Ollama run). Through the Decoder interface each step would carry the whole vocabulary back
through the binding's JSON (inference/llamacpp/engine.py), which measures JSON, not llama.cpp. Prefill and time
to first token: the wall-clock time of one request that samples one token; decode: the `new_tokens` passes of a
request that samples `new_tokens + 1` (the last pass over the whole context), timed by llama.cpp's own clock
(_decode_rate says why).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from moemla.config import ConfigError, ModelConfig, variant_name
from moemla.data.sources import EOT
from moemla.progress import Progress


def gguf_type(quantize: str, dtype: torch.dtype) -> str:
    """bench's flags as llama.cpp's weight type: none -> f32 (f16 with --dtype float16), int8 -> q8_0, int4 -> q4_0:
    the same precision as the numba and ONNX rows they sit beside."""
    if quantize != "none":
        return {"int8": "q8_0", "int4": "q4_0"}[quantize]
    return {torch.float32: "f32", torch.float16: "f16"}.get(dtype) or _refuse(dtype)


def _refuse(dtype: torch.dtype) -> str:
    raise ConfigError(f"--engine llama.cpp runs float32 or float16 weights (or --quantize int8 / int4), not {dtype}")


def synthetic_tokenizer(vocab_size: int) -> Tokenizer:
    """A byte-level BPE of exactly `vocab_size` tokens (<|endoftext|>, the bytes, then pairs with their merges):
    what a GGUF file of random weights needs to load; the text it writes means nothing."""
    # a vocabulary too small for every byte keeps fewer of them: llama.cpp needs at least one merge to load
    chars = sorted(pre_tokenizers.ByteLevel.alphabet())[: max(2, min(256, vocab_size - 2))]
    vocab = {EOT: 0, **{c: i + 1 for i, c in enumerate(chars)}}
    merges = []
    for a in chars:
        for b in chars:
            if len(vocab) >= vocab_size:
                break
            vocab[a + b] = len(vocab)
            merges.append((a, b))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOT])
    return tok


def bench_llamacpp(
    cfg: ModelConfig, batch: int, context: int, new_tokens: int, *, quantize: str = "none",
    dtype: torch.dtype = torch.float32, repeats: int = 2,
) -> dict[str, object]:  # fmt: skip
    """One bench row: the best of `repeats` timed runs after one warm-up, llama.cpp's default f16 cache."""
    from moemla.export.gguf import gguf_architecture, write_gguf_folder
    from moemla.inference.llamacpp.engine import LlamaCppDecoder
    from moemla.model import Transformer

    try:
        gguf_architecture(cfg)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if context > cfg.max_seq_len:
        raise ConfigError(f"--context {context} exceeds the model's max_seq_len ({cfg.max_seq_len})")
    qtype = gguf_type(quantize, dtype)
    torch.manual_seed(0)
    model = Transformer(cfg.replace(dropout=0.0))
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(1, cfg.vocab_size, (batch, context - new_tokens), generator=gen).tolist()
    name = f"bench {variant_name(cfg) or 'custom'} batch {batch} (llama.cpp {qtype})"
    with tempfile.TemporaryDirectory(prefix="moemla-gguf-") as tmp:
        write_gguf_folder(model, synthetic_tokenizer(cfg.vocab_size), Path(tmp), qtype)  # type: ignore[arg-type]
        dec = LlamaCppDecoder(tmp, slots=batch, ctx=context + 1)
        try:
            best = _best_run(dec, prompts, new_tokens, repeats, name)
        finally:
            dec.close()
    return {
        "variant": variant_name(cfg) or "custom", "batch": batch, "context": context, "new_tokens": new_tokens,
        "device": "cpu", "dtype": qtype, "engine": "llama.cpp", "quantize": quantize,
        "decode_path": "absorbed" if cfg.attention == "mla" else "naive", "compiled": True, "cuda_graph": False,
        "kv_cache_bytes_per_token": dec.kv_bytes_per_token, "kv_cache_dtype": "f16", **best,
        "peak_memory_bytes": dec.weight_nbytes + dec.kv_bytes_per_token * batch * context,
        "peak_memory_kind": "weights + cache", "weight_bytes": dec.weight_nbytes,
    }  # fmt: skip


def _best_run(dec: object, prompts: list[list[int]], new_tokens: int, repeats: int, name: str) -> dict[str, object]:
    best: dict[str, object] | None = None
    batch, prompt_len = len(prompts), len(prompts[0])
    with Progress(name, total=repeats + 1, unit="runs") as bar:
        for _ in range(repeats + 1):  # the first also warms up
            first = dec.generate_native(prompts, 1)
            full = dec.generate_native(prompts, new_tokens + 1)
            row = {
                "prefill_tokens_per_s": batch * prompt_len / first["seconds"],
                "ttft_ms": 1e3 * first["seconds"],
                "decode_tokens_per_s": _decode_rate(full, first, batch, new_tokens),
                "latency_ms_p50": None,  # llama.cpp's loop does not report each step
                "latency_ms_p95": None,
            }
            row["latency_ms_mean"] = 1e3 * batch / row["decode_tokens_per_s"]
            if best is None or row["decode_tokens_per_s"] > best["decode_tokens_per_s"]:  # type: ignore[operator]
                best = row
            bar.advance()
    return best  # type: ignore[return-value]


def _decode_rate(full: dict, first: dict, batch: int, new_tokens: int) -> float:
    """Tokens/s of the decode passes, by llama.cpp's own clock where it reports one: its generation time covers
    the passes after the first token (predicted_n - 1 of them), and with the rows decoding together in one batch
    each slot's time is the batch's. Wall-clock differences of two requests are too coarse for a small model (a
    64-token decode of `tiny` takes ~15 ms, the noise of a request's start)."""
    timings = full.get("timings") or {}
    if timings.get("predicted_ms") and timings.get("predicted_n", 0) > 1:
        return batch * (timings["predicted_n"] - 1) / (timings["predicted_ms"] / 1e3)
    return batch * new_tokens / max(full["seconds"] - first["seconds"], 1e-9)
