"""The model as an ONNX Runtime artifact: the exportable graph (graph.py, torch), the writer of an export folder
(write.py, torch + onnx), and the torch-free engine that decodes one (engine.py: onnxruntime + numpy)."""

from moemla.folders import MANIFEST, ONNX_FORMAT

__all__ = ["EXTRA", "FORMAT", "MANIFEST", "MODEL", "VERSION"]

FORMAT = ONNX_FORMAT  # the manifest's "format"; its "version" changes when the graph's interface does
MODEL = "model.onnx"
VERSION = 2  # 2: the logits_at input
EXTRA = "pip install 'moemla[onnx]' (onnx, onnxruntime, onnxscript)"
