"""int8 weight-only quantization for the CPU engine: one scale per output channel, routed experts included.

Why: a batch-1 decode step reads every weight it uses once, so its time is the bytes it streams. int8
weights are a quarter of fp32's. Activations, norms, the attention over the cache, the routing biases and
the small MLA up-projections (W^Kr, W^Vr, read per head) stay fp32. An int8 matrix is kept as rows, one per
output channel, (..., out, in): the compiled kernels take one dot product per row over contiguous bytes,
which numba vectorizes (measured: the fp32 (in, out) layout's column updates do not gain from int8, rows do).
"""

from __future__ import annotations

import numpy as np


def to_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows W (..., out, in) -> int8 W_q and fp32 scales (..., out): W ~ W_q * scale, symmetric, per row."""
    amax = np.abs(w).max(axis=-1)  # (..., out)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale[..., None]), -127, 127).astype(np.int8)
    return np.ascontiguousarray(q), scale


def quantize_layer(layer: object) -> None:
    """A Linear or Fused of the numpy decoder in place: its fp32 wt (in, out) becomes int8 rows wq (out, in)."""
    layer.wq, layer.scale = to_int8(layer.wt.T)  # type: ignore[attr-defined]
    layer.wt = None  # type: ignore[attr-defined]


def matmul(x: np.ndarray, wt: np.ndarray | None, wq: np.ndarray | None, scale: np.ndarray | None) -> np.ndarray:
    """x (..., in) times a layer's weights: fp32 wt (in, out), or int8 rows wq (out, in) with their scales."""
    if wq is None:
        return x @ wt
    return (x @ wq.T.astype(np.float32)) * scale
