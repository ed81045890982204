"""int8 weight-only quantization for the CPU engine: one scale per output channel, routed experts included.

Why: a batch-1 decode step reads every weight it uses once, so its time is the bytes it streams. int8
weights are a quarter of fp32's. Activations, norms, the attention over the cache, the routing biases and
the small MLA up-projections (W^Kr, W^Vr, read per head) stay fp32; each int8 matrix is dequantized inside
the matrix-vector product (numba kernels) or right before it (numpy path, prefill).
"""

from __future__ import annotations

import numpy as np


def to_int8(wt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """W (..., in, out) -> int8 W_q and fp32 scales (..., out): W ~ W_q * scale, symmetric, per output column."""
    amax = np.abs(wt).max(axis=-2)  # (..., out)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(wt / scale[..., None, :]), -127, 127).astype(np.int8)
    return q, scale


def quantize_layer(layer: object) -> None:
    """A Linear or Fused of the numpy decoder (wt (in, out) fp32) in place: wt becomes int8, `scale` is set."""
    layer.wt, layer.scale = to_int8(layer.wt)  # type: ignore[attr-defined]


def matmul(x: np.ndarray, wt: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    """x (..., in) @ W (in, out) for fp32 W (scale None) or int8 W with per-column scales."""
    if scale is None:
        return x @ wt
    return (x @ wt.astype(np.float32)) * scale
