"""`moemla export RUN OUT --format onnx`: a trained run as an ONNX Runtime folder (inference/onnx writes it).

A quantized export also reports its validation perplexity beside the fp32 graph's, on the run's own validation
data where that data is still on disk.
"""

from __future__ import annotations

import json
from pathlib import Path

from moemla.config import ConfigError
from moemla.data.sources import EOT
from moemla.inference.onnx import MANIFEST
from moemla.inference.onnx.write import OnnxQuantize, check_exportable, require_onnx, write_onnx
from moemla.model import Transformer
from moemla.runs import RunFolder
from moemla.runs.checkpoint import write_text_atomic
from moemla.runs.folder import TOKENIZER_FILE

EVAL_TOKENS = 32_768  # validation tokens a quantized export is scored on, fp32 beside it


def export_onnx(
    run_dir: str | Path, out_dir: str | Path, *, quantize: OnnxQuantize = "none", checkpoint: str | None = None,
    overwrite: bool = False,
) -> dict[str, object]:  # fmt: skip
    """Write the run's checkpoint to out_dir as an ONNX export folder; returns its manifest."""
    require_onnx()
    run = RunFolder.open(run_dir)
    cfg = run.model_config
    check_exportable(cfg, quantize)  # before loading weights or touching OUT
    out = check_out(Path(out_dir), overwrite)
    model, tok = run.load_model("cpu", checkpoint), run.tokenizer()
    ckpt = run.checkpoint(checkpoint)
    source = {"run": str(Path(run_dir).resolve()), "checkpoint": ckpt.name if ckpt else None}
    manifest = write_onnx(model, out, quantize=quantize, tokenizer=Path(run_dir) / TOKENIZER_FILE,
                          eos_token_id=tok.token_to_id(EOT), source=source)  # fmt: skip
    if quantize != "none":
        manifest |= quantized_perplexity(run, model, out)
        write_text_atomic(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


def check_out(out: Path, overwrite: bool) -> Path:
    """out, if an export may be written there: not a file, and empty unless overwrite."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file; give a folder to write the export into")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out} exists and is not empty; choose a new folder or pass --overwrite")
    return out


def quantized_perplexity(run: RunFolder, model: Transformer, out: Path) -> dict[str, float]:
    """Validation perplexity of the quantized graph and of the fp32 model on the same windows of the run's own
    validation data ({} where that data is no longer on disk)."""
    from moemla.data.shards import PreparedData
    from moemla.data.sources import DataError
    from moemla.data.tokenizer import token_bytes
    from moemla.eval.perplexity import evaluate
    from moemla.inference.onnx.engine import OnnxDecoder

    try:
        shards = PreparedData.open(run.meta["data"]["path"]).shards("val")
    except (DataError, KeyError, OSError):
        return {}
    seq_len = run.train_settings.get("seq_len", model.cfg.max_seq_len)
    kw = {"seq_len": seq_len, "batch_size": 8, "max_tokens": EVAL_TOKENS, "token_bytes": token_bytes(run.tokenizer())}
    quantized, fp32 = evaluate(OnnxDecoder(out), shards, **kw), evaluate(model, shards, **kw)
    return {"validation_perplexity": quantized["val_ppl"], "fp32_validation_perplexity": fp32["val_ppl"],
            "validation_tokens": quantized["tokens"]}  # fmt: skip
