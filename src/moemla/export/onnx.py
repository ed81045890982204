"""`moemla export RUN OUT --format onnx`: a trained run as an ONNX Runtime folder (inference/onnx writes it).

A quantized export also reports its validation perplexity beside the fp32 graph's, on the run's own validation
data where that data is still on disk.
"""

from __future__ import annotations

import json
from pathlib import Path

from moemla.data.sources import EOT
from moemla.folders import assembled, check_destination, write_text_atomic
from moemla.inference.onnx import MANIFEST
from moemla.inference.onnx.write import OnnxQuantize, check_exportable, require_onnx, write_onnx
from moemla.model import Transformer
from moemla.runs import RunFolder
from moemla.runs.folder import TOKENIZER_FILE

EVAL_TOKENS = 32_768  # validation tokens a quantized export is scored on, fp32 beside it


def export_onnx(
    run_dir: str | Path, out_dir: str | Path, *, quantize: OnnxQuantize = "none", checkpoint: str | None = None,
    overwrite: bool = False,
) -> dict[str, object]:  # fmt: skip
    """Write the run's checkpoint to out_dir as an ONNX export folder; returns its manifest. The folder is assembled
    beside out_dir, perplexity included, and moved into place only when complete: an interrupted export leaves
    what was there before."""
    require_onnx()
    run = RunFolder.open(run_dir)
    check_exportable(run.model_config, quantize)  # before loading weights or touching OUT
    out = check_destination(out_dir, "export", sources=(run_dir,), overwrite=overwrite)
    with assembled(out, "export") as folder:
        manifest = write_export(run, folder, quantize, checkpoint)
    return manifest


def write_export(run: RunFolder, folder: Path, quantize: OnnxQuantize, checkpoint: str | None) -> dict[str, object]:
    """The complete export folder at `folder` (a new path): graph, runner, tokenizer, and the manifest with the
    quantized perplexity measured or recorded as not measured (and why)."""
    model, tok = run.load_model("cpu", checkpoint, finite=True), run.tokenizer()
    ckpt = run.checkpoint(checkpoint)
    source = {"run": str(run.path.resolve()), "checkpoint": ckpt.name if ckpt else None}
    manifest = write_onnx(model, folder, quantize=quantize, tokenizer=run.path / TOKENIZER_FILE,
                          eos_token_id=tok.token_to_id(EOT), source=source)  # fmt: skip
    if quantize != "none":
        manifest |= quantized_perplexity(run, model, folder)
        write_text_atomic(folder / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


def quantized_perplexity(run: RunFolder, model: Transformer, out: Path) -> dict[str, float]:
    """Validation perplexity of the quantized graph and of the fp32 model on the same windows of the run's own
    validation data (None, with the reason, where that data is no longer on disk)."""
    from moemla.data.shards import PreparedData
    from moemla.data.sources import DataError
    from moemla.data.tokenizer import token_bytes
    from moemla.eval.perplexity import evaluate
    from moemla.inference.onnx.engine import OnnxDecoder

    try:
        shards = PreparedData.open(run.data_path or "").shards("val")
    except (DataError, KeyError, OSError):
        why = f"the run's validation data ({run.data_path}) is not on disk; `moemla eval OUT --data FOLDER` measures it"
        return {"validation_perplexity": None, "perplexity_not_measured": why}
    seq_len = run.train_settings.get("seq_len", model.cfg.max_seq_len)
    kw = {"seq_len": seq_len, "batch_size": 8, "max_tokens": EVAL_TOKENS, "token_bytes": token_bytes(run.tokenizer())}
    quantized, fp32 = evaluate(OnnxDecoder(out), shards, **kw), evaluate(model, shards, **kw)
    return {"validation_perplexity": quantized["val_ppl"], "fp32_validation_perplexity": fp32["val_ppl"],
            "validation_tokens": quantized["tokens"]}  # fmt: skip
