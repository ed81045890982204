"""Write a model as an ONNX export folder: model.onnx (fp32, int8 or int4 weights), manifest.json, tokenizer.json and
a self-contained example runner. Used by `moemla export --format onnx` (a trained run) and `moemla bench --engine
onnx` (a preset's random weights).

Exporter: `torch.onnx.export(dynamo=True)`. It traces graph.ExportedLM through torch.export, so the two choices
made by the number of new tokens (absorbed MLA steps, gathered experts) become ONNX If nodes in one graph that
serves prefill and single-token steps; the TorchScript exporter cannot trace that choice without scripting.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import logging
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from moemla import accounting
from moemla.config import ONNX_PORTABLE, ConfigError, ModelConfig, QuantizeKind, check_portable, variant_name
from moemla.folders import TOKENIZER_FILE, assembled, file_sizes
from moemla.inference.cpu.quant import to_int8
from moemla.inference.onnx import EXTRA, FORMAT, MANIFEST, MODEL, VERSION
from moemla.inference.onnx.graph import ExportedLM, cache_names, cache_shape
from moemla.inference.sampling import SamplingConfig
from moemla.model import Transformer

OnnxQuantize = QuantizeKind
RUNNER = Path(__file__).with_name("runner.py")  # copied into every export as run_onnx.py, never imported
INT4_BLOCK = 32  # MatMulNBits' block of input channels sharing one scale


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


def map_nodes(graph: object, replace: Callable[[object], list]) -> None:
    """Each node of graph, and of its If branches first, replaced by the nodes replace(copy of it) returns (a copy:
    clearing graph.node frees the originals)."""
    nodes = []
    for node in graph.node:
        for attr in node.attribute:
            if attr.g.node:
                map_nodes(attr.g, replace)
        nodes += replace(copy.deepcopy(node))
    del graph.node[:]
    graph.node.extend(nodes)


def gemm_to_matmul(model: object) -> None:
    """Every Gemm with a constant, transposed B (how F.linear exports) as MatMul (+ Add): onnxruntime's quantizers
    take MatMul only. The router's stays a Gemm in fp32, so routing is perturbed no more than the weights force."""
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    made: set[str] = set()

    def replace(node: object) -> list:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        b = node.input[1] if node.op_type == "Gemm" else ""
        plain = attrs.get("transB") == 1 and not attrs.get("transA") and attrs.get("alpha", 1.0) == 1.0
        if node.op_type != "Gemm" or b not in inits or ".router." in b or not plain or attrs.get("beta", 1.0) != 1:
            return [node]
        if b not in made:  # one transposed copy per weight, shared by every use
            model.graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(inits[b]).T.copy(), b + ".T"))
            made.add(b)
        out = node.output[0] if len(node.input) < 3 else node.output[0] + ".mm"
        nodes = [helper.make_node("MatMul", [node.input[0], b + ".T"], [out], name=node.name + ".mm")]
        if len(node.input) > 2:
            nodes.append(helper.make_node("Add", [out, node.input[2]], [node.output[0]], name=node.name + ".add"))
        return nodes

    map_nodes(model.graph, replace)
    unused = set(made) - {i for n in _all_nodes(model.graph) for i in n.input}
    keep = [t for t in model.graph.initializer if t.name not in unused]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def quantize_gathered(model: object) -> list[str]:
    """The embedding (V, C) and the routed experts (E, C, h) / (E, h, C) as int8 with per-row / per-output-channel
    scales: onnxruntime's quantizers take only MatMuls with a constant 2-D weight, and these are gathered (token
    ids, chosen experts) before use. A Gather of one becomes Gather(int8) * Gather(scale), so a decode step reads
    only the chosen rows, in int8; any other use (every expert under the gate mask) dequantizes the whole tensor.
    Returns the names quantized."""
    from onnx import helper, numpy_helper

    targets = {t.name: t for t in model.graph.initializer
               if t.name == "model.wte.weight" or t.name.endswith((".experts.w1", ".experts.w2"))}  # fmt: skip
    for name, tensor in targets.items():
        w = numpy_helper.to_array(tensor)
        # per token row (V, C); per expert and output channel (E, in, out), as rows (E, out, in) for to_int8
        rows = w if w.ndim == 2 else w.swapaxes(1, 2)
        q, scale = to_int8(rows)
        q, scale = (q, scale[:, None]) if w.ndim == 2 else (q.swapaxes(1, 2), scale[:, None, :])
        model.graph.initializer.remove(tensor)
        model.graph.initializer.extend(
            [numpy_helper.from_array(q, name + ".q"), numpy_helper.from_array(scale, name + ".scale")]
        )
    count = [0]

    def replace(node: object) -> list:
        used = [i for i, x in enumerate(node.input) if x in targets]
        axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
        if node.op_type == "Gather" and used == [0] and axis == 0:
            w, idx, k = node.input[0], node.input[1], count[0]
            count[0] += 1
            return [
                helper.make_node("Gather", [w + ".q", idx], [f"{w}.q.g{k}"], name=f"{node.name}.q"),
                helper.make_node("Cast", [f"{w}.q.g{k}"], [f"{w}.f.g{k}"], to=1, name=f"{node.name}.cast"),
                helper.make_node("Gather", [w + ".scale", idx], [f"{w}.s.g{k}"], name=f"{node.name}.scale"),
                helper.make_node("Mul", [f"{w}.f.g{k}", f"{w}.s.g{k}"], list(node.output), name=f"{node.name}.mul"),
            ]
        nodes = []
        for i in used:
            w, k = node.input[i], count[0]
            count[0] += 1
            nodes += [
                helper.make_node("Cast", [w + ".q"], [f"{w}.f{k}"], to=1, name=f"{w}.cast{k}"),
                helper.make_node("Mul", [f"{w}.f{k}", w + ".scale"], [f"{w}.deq{k}"], name=f"{w}.deq{k}"),
            ]
            node.input[i] = f"{w}.deq{k}"
        return [*nodes, node]

    map_nodes(model.graph, replace)
    return list(targets)


def sort_nodes(graph: object) -> None:
    """graph's nodes in an order where each comes after what it reads, the names its If branches read from the
    outer graph included (onnxruntime's quantizers can move an If above the node that feeds its branch)."""
    produced = {o for n in graph.node for o in n.output}
    needs = [({i for i in _reads(n) if i in produced}, n) for n in graph.node]
    done: set[str] = set()
    order = []
    while needs:
        ready = [(r, n) for r, n in needs if r <= done]
        if not ready:
            raise ConfigError("the quantized graph has a cycle; please report this")
        for _, n in ready:
            order.append(copy.deepcopy(n))
            done.update(n.output)
        emitted = {id(n) for _, n in ready}
        needs = [(r, n) for r, n in needs if id(n) not in emitted]
    del graph.node[:]
    graph.node.extend(order)


def _reads(node: object) -> set[str]:
    """Every name a node reads: its inputs and what its subgraphs read that they do not produce."""
    names = set(node.input)
    for attr in node.attribute:
        if attr.g.node:
            inner = {o for n in attr.g.node for o in n.output}
            names |= {i for n in attr.g.node for i in _reads(n)} - inner
    return names


def _all_nodes(graph: object) -> list:
    out = []
    for node in graph.node:
        out.append(node)
        for attr in node.attribute:
            if attr.g.node:
                out += _all_nodes(attr.g)
    return out


def quantize_file(src: Path, dst: Path, quantize: OnnxQuantize) -> None:
    """src (fp32) -> dst: the dense MatMuls as int8 (dynamic, onnxruntime's quantize_dynamic) or int4 (weight-only
    4-bit blocks, MatMulNBits), the embedding and the routed experts as int8 (quantize_gathered), the routers fp32."""
    import onnx

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # one INFO line per node otherwise
    model = onnx.load(str(src))
    gemm_to_matmul(model)  # the LM head becomes a MatMul on its own copy: the embedding's is then gathered only
    quantize_gathered(model)
    if quantize == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        plain = src.with_name("matmul.onnx")
        onnx.save(model, str(plain))
        root = logging.getLogger()  # quantize_dynamic advises pre-processing on the root logger: not for our graph
        level, root.level = root.level, logging.ERROR
        try:
            quantize_dynamic(str(plain), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                             extra_options={"MatMulConstBOnly": True})  # fmt: skip
        finally:
            root.level = level
        plain.unlink()
    else:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=INT4_BLOCK, is_symmetric=True, accuracy_level=4)
        quantizer.process()
        quantizer.model.save_model_to_file(str(dst), use_external_data_format=False)
    # both quantizers sort nodes by their inputs alone, which can lift an If above what its branches read
    quantized = onnx.load(str(dst))
    sort_nodes(quantized.graph)
    onnx.save(quantized, str(dst))


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
