"""Write a model as an ONNX export folder: model.onnx (fp32, int8 or int4 weights: quantize.py rewrites and
quantizes the graph), manifest.json, tokenizer.json and a self-contained example runner. Used by `moemla export
--format onnx` (a trained run) and `moemla bench --engine onnx` (a preset's random weights).

Exporter: `torch.onnx.export(dynamo=True)`. It traces graph.ExportedLM through torch.export, so the two choices
made by the number of new tokens (absorbed MLA steps, gathered experts) become ONNX If nodes in one graph that
serves prefill and single-token steps; the TorchScript exporter cannot trace that choice without scripting.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from moemla import accounting
from moemla.config import ONNX_PORTABLE, ConfigError, ModelConfig, QuantizeKind, check_portable, variant_name
from moemla.folders import TOKENIZER_FILE, assembled, file_sizes
from moemla.inference.onnx import EXTRA, FORMAT, MANIFEST, MODEL, VERSION
from moemla.inference.onnx.graph import ExportedLM, cache_names, cache_shape
from moemla.inference.onnx.quantize import quantize_file
from moemla.inference.sampling import SamplingConfig
from moemla.model import Transformer

OnnxQuantize = QuantizeKind
RUNNER = Path(__file__).with_name("runner.py")  # copied into every export as run_onnx.py, never imported


def require_onnx() -> None:
    """ConfigError naming the extra when onnx, onnxruntime or onnxscript is missing."""
    for name in ("onnx", "onnxruntime", "onnxscript"):
        try:
            __import__(name)
        except ImportError:
            raise ConfigError(f"the ONNX export needs {name}: {EXTRA}") from None


def check_exportable(cfg: ModelConfig, quantize: OnnxQuantize) -> None:
    """The one check of what the ONNX graph implements, before any file is written. (int4 blocks any width:
    MatMulNBits pads a width that is not a multiple of its block.)"""
    check_portable(cfg, "the ONNX export", "export a model that keeps it at its default (top-k routing)",
                   ONNX_PORTABLE)  # fmt: skip
    if quantize not in ("none", "int8", "int4"):
        raise ConfigError(f"--quantize must be none, int8 or int4, not {quantize!r}")


def example_inputs(cfg: ModelConfig, batch: int = 2, new: int = 3, past: int = 2) -> tuple:
    """(input_ids, attention_mask, logits_at, *past): what the tracer runs once; every axis but the channels is
    dynamic."""
    ids = torch.randint(0, cfg.vocab_size, (batch, new))
    mask = torch.ones(batch, past + new, dtype=torch.long)
    sizes = {"batch": batch, "past": past}
    cache = [torch.zeros([sizes.get(n, n) for n in cache_shape(cfg, name)]) for name in cache_names(cfg)]
    logits_at = torch.arange(new).repeat(batch, 1)  # (B, K)
    return ids, mask, logits_at, *cache


def export_graph(model: Transformer, path: Path) -> None:
    """model as an fp32 ONNX file at path: dynamic batch, new-token, past and mask axes."""
    cfg = model.cfg
    dim = torch.export.Dim
    batch, new = dim("batch", min=1, max=4096), dim("new", min=1, max=cfg.max_seq_len)
    past = dim("past", min=0, max=cfg.max_seq_len - 1)
    names = cache_names(cfg)
    axes = [{0: batch, cache_shape(cfg, n).index("past"): past} for n in names]
    shapes = ({0: batch, 1: new}, {0: batch, 1: dim.DYNAMIC}, {0: batch, 1: dim.DYNAMIC}, tuple(axes))
    graph = ExportedLM(model.float().cpu()).eval()
    quiet = logging.getLogger("torch.onnx")  # its notes (torchvision not installed, ...) are not the user's
    level, quiet.level = quiet.level, logging.ERROR
    with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # the exporter's deprecation and axis-renaming notes neither
        torch.onnx.export(
            graph, example_inputs(cfg), str(path), dynamo=True, dynamic_shapes=shapes, verbose=False,
            input_names=["input_ids", "attention_mask", "logits_at", *[f"past.{n}" for n in names]],
            output_names=["logits", *[f"present.{n}" for n in names]],
            external_data=accounting.total_params(cfg) * 4 > 1.8e9,  # protobuf's 2 GB limit, with room
        )  # fmt: skip
    quiet.level = level


def check_file(path: Path, model: Transformer, quantize: OnnxQuantize) -> dict[str, float]:
    """onnx.checker on the file, then one run against the torch model: a left-padded batch prefill and a cached step.
    fp32 must agree within 1e-3 (tests hold 1e-4); a quantized file reports its error and top-1 agreement."""
    import onnx

    onnx.checker.check_model(str(path))
    from moemla.inference.onnx.engine import OnnxSession

    session = OnnxSession(path, model.cfg, cache_entries(model.cfg))
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, model.cfg.vocab_size, (n,), generator=gen).tolist() for n in (7, 4)]
    model = model.float().cpu().eval()

    def last_logits(ids: list[int]) -> np.ndarray:  # the model itself, no cache, no padding
        with torch.no_grad():
            return model(torch.tensor([ids]))[0][0, -1].numpy()

    got = [session.prefill(prompts), session.step([1, 2])]
    stepped = [[*p, t] for p, t in zip(prompts, [1, 2], strict=True)]
    want = [np.stack([last_logits(p) for p in prompts]), np.stack([last_logits(p) for p in stepped])]
    got_a, want_a = np.concatenate(got), np.concatenate(want)
    err = float(np.abs(got_a - want_a).max())
    if quantize == "none" and not err < 1e-3:
        raise ConfigError(f"the exported graph's logits differ from the model's by {err:.2e}; please report this")
    return {"max_abs_logit_error": err, "top1_agreement": float((got_a.argmax(-1) == want_a.argmax(-1)).mean())}


def write_onnx(
    model: Transformer, out: Path, *, quantize: OnnxQuantize = "none", tokenizer: Path | None = None,
    eos_token_id: int | None = None, source: dict[str, object] | None = None,
) -> dict[str, object]:  # fmt: skip
    """The export folder at `out`: written in a sibling temporary folder, checked, then renamed into place (over
    what was there), so a failure leaves nothing half-written and the old folder untouched. Returns the manifest."""
    require_onnx()
    cfg = model.cfg
    check_exportable(cfg, quantize)
    with assembled(out, "partial") as tmp:
        tmp.mkdir()
        start = time.perf_counter()
        fp32 = tmp / (MODEL if quantize == "none" else "fp32.onnx")
        export_graph(model, fp32)
        if quantize != "none":
            quantize_file(fp32, tmp / MODEL, quantize)
            for f in tmp.glob("fp32.onnx*"):
                f.unlink()
        checked = check_file(tmp / MODEL, model, quantize)
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / TOKENIZER_FILE)
        shutil.copyfile(RUNNER, tmp / "run_onnx.py")
        manifest = build_manifest(cfg, quantize, eos_token_id, checked, source, tmp)
        manifest["export_seconds"] = round(time.perf_counter() - start, 1)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def cache_entries(cfg: ModelConfig) -> list[dict[str, object]]:
    """The cache's tensors in graph order: input and output names and shape (batch, past, *the layer's spec)."""
    return [{"past": f"past.{n}", "present": f"present.{n}", "shape": cache_shape(cfg, n)} for n in cache_names(cfg)]


def build_manifest(
    cfg: ModelConfig, quantize: OnnxQuantize, eos: int | None, checked: dict, source: dict | None, folder: Path
) -> dict[str, object]:
    """What a runner needs besides the graph: the config, the cache's tensors and shapes, eos, sampling defaults."""
    cache = cache_entries(cfg)
    files = file_sizes(folder)
    return {
        "format": FORMAT,
        "version": VERSION,
        "variant": variant_name(cfg),
        "quantize": quantize,
        "config": cfg.to_dict(),
        "inputs": ["input_ids", "attention_mask", "logits_at", *[c["past"] for c in cache]],
        "outputs": ["logits", *[c["present"] for c in cache]],
        "cache": cache,
        "cache_dtype": "float32",
        "kv_cache_bytes_per_token": accounting.kv_cache_bytes_per_token(cfg),
        "total_params": accounting.total_params(cfg),
        "active_params": accounting.active_params(cfg),
        "eos_token_id": eos,
        "sampling": {k: v for k, v in dataclasses.asdict(SamplingConfig()).items() if k != "seed"},
        "check": checked,
        "files": files,
        "source": source or {},
    }
