"""Evaluating a folder: a run's checkpoint, or an ONNX or GGUF export, on a prepared split or on raw text files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from moemla.data.shards import PreparedData
from moemla.data.sources import DataError, file_source
from moemla.data.tokenizer import eot_id, load_tokenizer, token_bytes
from moemla.device import amp_dtype, resolve_device
from moemla.eval.perplexity import evaluate
from moemla.folders import TOKENIZER_FILE
from moemla.inference.llamacpp.engine import LlamaCppDecoder, is_gguf_folder
from moemla.inference.onnx.engine import OnnxDecoder, is_onnx_folder, refuse_export_flags
from moemla.runs import RunError, RunFolder

EVAL_BATCH = 16  # sequences per forward where the run does not say


def text_tokens(paths: list[str], tok) -> list[np.ndarray]:
    """Raw text files tokenized with a run's tokenizer, stories separated by <|endoftext|>, as one shard."""
    eot = eot_id(tok)
    ids: list[int] = []
    for enc in tok.encode_batch(list(file_source(paths)())):
        ids += [*enc.ids, eot]
    return [np.array(ids, dtype=np.int64)]


def _evaluate_export(
    folder: str | Path, data_dir: str | Path | None, text: list[str] | None, split: str, max_tokens: int | None,
    batch_size: int | None, device: str, checkpoint_name: str | None,
) -> dict:  # fmt: skip
    """`moemla eval EXPORT`: an ONNX graph's or a GGUF file's perplexity (onnxruntime or llama.cpp), on the CPU, in
    windows of the model's context."""
    gguf = is_gguf_folder(folder)
    refuse_export_flags(folder, "gguf" if gguf else "onnx", device=device not in ("auto", "cpu"),
                        checkpoint=checkpoint_name is not None)  # fmt: skip
    if gguf:
        dec = LlamaCppDecoder(folder)
        tok = dec.tokenizer
    else:
        dec = OnnxDecoder(folder)
        tok = load_tokenizer(str(Path(folder) / TOKENIZER_FILE))
    source = dec.manifest.get("source", {}).get("run")
    run = RunFolder(source) if source and RunFolder(source).exists() else None
    if text:
        shards = text_tokens(text, tok)
    else:
        if data_dir is None and run is None:
            raise DataError(f"{folder} does not say where its data is; pass --data PREPARED_FOLDER or --text FILE")
        shards = PreparedData.open(data_dir or run.data_path or "").shards(split)
    # the windows the run was evaluated on in training, where the run is still on disk
    seq_len = run.train_settings.get("seq_len", dec.cfg.max_seq_len) if run else dec.cfg.max_seq_len
    seq_len = min(seq_len, dec.max_len)  # llama.cpp holds one token less (its decoder says why)
    batch = EVAL_BATCH if batch_size is None else batch_size
    kw = {"seq_len": seq_len, "batch_size": batch, "max_tokens": max_tokens, "token_bytes": token_bytes(tok)}
    result = {"run": str(folder), "engine": "llama.cpp" if gguf else "onnxruntime", **evaluate(dec, shards, **kw)}
    if gguf:
        dec.close()
    if run is not None:  # the same windows in the run's own fp32 model: what the export's quantization cost
        checkpoint = dec.manifest.get("source", {}).get("checkpoint")
        try:
            model = run.load_model("cpu", checkpoint)
        except (RunError, OSError, ValueError):  # the checkpoint is gone: the export's number stands alone
            return result
        fp32 = evaluate(model, shards, **kw)
        result["fp32"] = {"checkpoint": checkpoint, **{k: fp32[k] for k in ("val_loss", "val_ppl", "bits_per_byte")}}
        result["ppl_vs_fp32"] = result["val_ppl"] / fp32["val_ppl"] - 1
    return result


def evaluate_run(
    run_dir: str | Path,
    *,
    data_dir: str | Path | None = None,
    text: list[str] | None = None,
    split: str = "val",
    max_tokens: int | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    checkpoint_name: str | None = None,
) -> dict:
    """`moemla eval`: a run's checkpoint on a prepared split (default: its training data's) or on raw text; or an
    ONNX or GGUF export folder, scored by onnxruntime or llama.cpp (its data: --data, --text, or that of the run it
    was exported from)."""
    if is_onnx_folder(run_dir) or is_gguf_folder(run_dir):
        return _evaluate_export(run_dir, data_dir, text, split, max_tokens, batch_size, device, checkpoint_name)
    dev = resolve_device(device)
    run = RunFolder.open(run_dir)
    model, tok, meta = run.load_model(dev, checkpoint_name), run.tokenizer(), run.meta
    # evaluate as the run was trained (sequence length, micro-batch, precision) where run.json records it; an
    # imported run records only its sequence length
    train = {"seq_len": model.cfg.max_seq_len, "micro_batch_size": EVAL_BATCH, "amp": "auto", **run.train_settings}
    if text:
        shards = text_tokens(text, tok)
    else:
        data = PreparedData.open(data_dir or run.data_path or "")
        if data.tokenizer_sha256 != meta["data"]["tokenizer_sha256"]:
            raise DataError(
                f"{data.root} was tokenized with a different tokenizer than {run_dir} was trained with; "
                "evaluate on data prepared with the run's tokenizer, or pass raw text with --text"
            )
        shards = data.shards(split)
    batch = train["micro_batch_size"] if batch_size is None else batch_size
    result = evaluate(
        model, shards, seq_len=train["seq_len"], batch_size=batch, max_tokens=max_tokens, device=dev,
        dtype=amp_dtype(dev, train["amp"]), token_bytes=token_bytes(tok),
    )  # fmt: skip
    if not math.isfinite(result["val_loss"]):
        bad = sum(int((~torch.isfinite(p)).sum()) for p in model.parameters())
        held = f"its weights hold {bad:,} NaN or infinite values" if bad else "its weights are finite but overflow"
        raise RunError(
            f"{run_dir} ({checkpoint_name or 'newest checkpoint'}) has a loss of {result['val_loss']}: {held}; "
            "evaluate an earlier checkpoint with --checkpoint step_N"
        )
    return {"run": str(run_dir), **result}
