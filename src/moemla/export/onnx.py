"""`moemla export RUN OUT --format onnx`: a trained run as an ONNX Runtime folder (inference/onnx writes it).

A quantized export also reports its validation perplexity beside the fp32 graph's, on the run's own validation
data where that data is still on disk.
"""

from __future__ import annotations

from pathlib import Path

from moemla.config import ConfigError
from moemla.data.sources import EOT
from moemla.inference.onnx.write import OnnxQuantize, check_exportable, require_onnx, write_onnx
from moemla.runs import RunFolder
from moemla.runs.folder import TOKENIZER_FILE


def export_onnx(
    run_dir: str | Path, out_dir: str | Path, *, quantize: OnnxQuantize = "none", checkpoint: str | None = None,
    overwrite: bool = False,
) -> dict[str, object]:  # fmt: skip
    """Write the run's checkpoint to out_dir as an ONNX export folder; returns its manifest."""
    require_onnx()
    run = RunFolder.open(run_dir)
    cfg = run.model_config
    check_exportable(cfg, quantize)  # before loading weights or touching OUT
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file; give a folder to write the export into")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out} exists and is not empty; choose a new folder or pass --overwrite")
    model, tok = run.load_model("cpu", checkpoint), run.tokenizer()
    ckpt = run.checkpoint(checkpoint)
    source = {"run": str(Path(run_dir).resolve()), "checkpoint": ckpt.name if ckpt else None}
    return write_onnx(model, out, quantize=quantize, tokenizer=Path(run_dir) / TOKENIZER_FILE,
                      eos_token_id=tok.token_to_id(EOT), source=source)  # fmt: skip
