"""The ONNX graph's rewrites and quantization (write.py exports the fp32 graph, then calls quantize_file): the LM
head's Gemm as a MatMul on its own copy, the gathered embedding and routed experts as int8 (quantize_gathered), the
dense MatMuls int8 (onnxruntime's quantize_dynamic) or int4 (MatMulNBits), and the node order a quantizer can
break restored (sort_nodes)."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from pathlib import Path

from moemla.config import ConfigError, QuantizeKind
from moemla.inference.cpu.quant import to_int8

OnnxQuantize = QuantizeKind
INT4_BLOCK = 32  # MatMulNBits' block of input channels sharing one scale


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
