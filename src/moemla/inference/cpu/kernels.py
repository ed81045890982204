"""Compiled one-token kernels for NumpyDecoder (numba; the optional `fast` extra).

Why: at batch 1 a routed expert is a 256 KB matrix-vector product. OpenBLAS takes ~24 us for one
(~11 GB/s: its call and thread hand-off cost more than the read), and a step makes 72 of them. One
compiled loop over the K chosen experts streams them back to back from one core at ~20 GB/s, and
the small ops around them (routing, layer norm, GELU) cost no numpy call each (BENCHMARKS.md).
Importing this module needs numba; `moemla.inference.cpu.decoder` imports it only when asked to.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

_SQRT_HALF = np.float32(0.7071067811865476)


@njit(fastmath=True, cache=True, inline="always")
def _gelu(v: np.float32) -> np.float32:
    return np.float32(0.5) * v * (np.float32(1.0) + math.erf(v * _SQRT_HALF))  # exact (erf) GELU, as F.gelu


@njit(fastmath=True, cache=True, inline="always")
def _silu(v: np.float32) -> np.float32:
    return v / (np.float32(1.0) + np.exp(-v))


@njit(fastmath=True, cache=True)
def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x (C,) -> (C,), as torch's RMSNorm."""
    n = x.shape[0]
    ms = np.float32(0.0)
    for i in range(n):
        ms += x[i] * x[i]
    inv = np.float32(1.0) / np.sqrt(ms / n + np.float32(eps))
    out = np.empty_like(x)
    for i in range(n):
        out[i] = x[i] * inv * weight[i]
    return out


@njit(fastmath=True, cache=True)
def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    """x (C,) -> (C,), as torch's LayerNorm (biased variance)."""
    n = x.shape[0]
    mean = np.float32(0.0)
    for i in range(n):
        mean += x[i]
    mean /= n
    var = np.float32(0.0)
    for i in range(n):
        var += (x[i] - mean) ** 2
    inv = np.float32(1.0) / np.sqrt(var / n + np.float32(eps))
    out = np.empty_like(x)
    for i in range(n):
        out[i] = (x[i] - mean) * inv * weight[i] + bias[i]
    return out


@njit(fastmath=True, cache=True)
def route(
    logits: np.ndarray, bias: np.ndarray, k: int, bias_in_gate: bool, sigmoid: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Router logits (E,) -> the top-k experts (K,) and their normalized gates (K,), as NumpyDecoder.moe.

    Paper (Algorithm 1): gates from softmax(l + b). DeepSeek-V3: b only picks, sigmoid(l) (or softmax) weights.
    """
    shifted = logits + bias
    z = shifted if bias_in_gate else logits
    if sigmoid:
        scores = np.float32(1.0) / (np.float32(1.0) + np.exp(-z))
    else:
        scores = np.exp(z - z.max())
        scores /= scores.sum()
    pick = scores if bias_in_gate else scores + bias
    idx = np.argsort(-pick)[:k]
    gates = scores[idx]
    return idx, gates / gates.sum()


@njit(fastmath=True, cache=True)
def routed_experts(
    x: np.ndarray, w1: np.ndarray, w2: np.ndarray, idx: np.ndarray, gates: np.ndarray, y: np.ndarray, swiglu: bool
) -> None:
    """y (C,) += sum_k gates[k] * act(x W1[e_k]) W2[e_k]: Eq. 12's routed term for one token (act: GELU, or SwiGLU
    over W1's [gate | up] halves).

    x (C,), w1 (E, C, h) and w2 (E, h', C) in (in, out) layout, so both inner loops run along
    contiguous rows: each expert is one forward stream the prefetcher follows.
    """
    n_in, width = w1.shape[1], w1.shape[2]
    hidden = w2.shape[1]  # width, or width / 2 with SwiGLU
    h = np.empty(width, np.float32)
    for k in range(idx.shape[0]):
        e = idx[k]
        h[:] = 0.0
        for c in range(n_in):
            xc = x[c]
            for j in range(width):
                h[j] += xc * w1[e, c, j]
        _activate(h, hidden, gates[k], swiglu)
        for i in range(hidden):
            hi = h[i]
            for c in range(y.shape[0]):
                y[c] += hi * w2[e, i, c]


@njit(fastmath=True, cache=True, inline="always")
def _activate(h: np.ndarray, hidden: int, gate: np.float32, swiglu: bool) -> None:
    """h[:hidden] = gate * act(h) in place: GELU, or SiLU(h[:hidden]) * h[hidden:] (SwiGLU's halves)."""
    for j in range(hidden):
        h[j] = (_silu(h[j]) * h[hidden + j] if swiglu else _gelu(h[j])) * gate


@njit(fastmath=True, cache=True)
def gemv(x: np.ndarray, wt: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """x (in,) @ wt (in, out) + bias (out,): row by row, each row one contiguous read."""
    y = bias.copy()
    for c in range(wt.shape[0]):
        xc = x[c]
        for j in range(wt.shape[1]):
            y[j] += xc * wt[c, j]
    return y


@njit(fastmath=True, cache=True)
def gelu(x: np.ndarray) -> np.ndarray:
    out = np.empty_like(x)
    for j in range(x.shape[0]):
        out[j] = _gelu(x[j])
    return out


@njit(fastmath=True, cache=True)
def swiglu(x: np.ndarray) -> np.ndarray:
    """x (2h,) as [gate | up] -> SiLU(gate) * up (h,)."""
    half = x.shape[0] // 2
    out = np.empty(half, np.float32)
    for j in range(half):
        out[j] = _silu(x[j]) * x[half + j]
    return out


@njit(fastmath=True, cache=True)
def rope_rows(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rows x (N, D) of one position, angle tables (D/2,): model.rope's half-split rotation."""
    half = cos.shape[0]
    out = np.empty((x.shape[0], 2 * half), np.float32)
    for n in range(x.shape[0]):
        for i in range(half):
            a, b = x[n, i], x[n, half + i]
            out[n, i] = a * cos[i] - b * sin[i]
            out[n, half + i] = a * sin[i] + b * cos[i]
    return out


@njit(fastmath=True, cache=True)
def absorbed_scores(
    q_nope: np.ndarray, q_pe: np.ndarray, wk: np.ndarray, c_k: np.ndarray, k_pe: np.ndarray, end: int, scale: float
) -> np.ndarray:
    """Scores (H, end) of one query over the cached latents, W^Kr absorbed into the query (Eq. 13).

    q_nope (H, D), wk = W^Kr as (H, D, R), c_k (S, R); q_pe (H, P) and k_pe (S, P) are the decoupled
    RoPE parts (P = 0 without them). W^Kr's bias adds one constant per row, which softmax ignores.
    """
    n_heads, head_dim, rank = wk.shape
    q_lat = np.zeros((n_heads, rank), np.float32)
    for h in range(n_heads):
        for d in range(head_dim):
            qd = q_nope[h, d]
            for r in range(rank):
                q_lat[h, r] += qd * wk[h, d, r]
    scores = np.empty((n_heads, end), np.float32)
    for s in range(end):
        for h in range(n_heads):
            acc = np.float32(0.0)
            for r in range(rank):
                acc += q_lat[h, r] * c_k[s, r]
            for p in range(q_pe.shape[1]):
                acc += q_pe[h, p] * k_pe[s, p]
            scores[h, s] = acc * scale
    return scores


@njit(fastmath=True, cache=True)
def softmax_rows(scores: np.ndarray) -> np.ndarray:
    out = np.empty_like(scores)
    for h in range(scores.shape[0]):
        row = np.exp(scores[h] - scores[h].max())
        out[h] = row / row.sum()
    return out


@njit(fastmath=True, cache=True)
def latent_values(scores: np.ndarray, c_v: np.ndarray, wv: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """softmax(scores) (H, S) over the cached V-latents c_v (S, R), then W_h^Vr (H, D, R): (H*D,).

    W^Vr once per head after attention, not once per cached position (Eq. 14 absorbed).
    """
    n_heads, head_dim, rank = wv.shape
    probs = softmax_rows(scores)
    o_lat = np.zeros((n_heads, rank), np.float32)
    for s in range(scores.shape[1]):
        for h in range(n_heads):
            p = probs[h, s]
            for r in range(rank):
                o_lat[h, r] += p * c_v[s, r]
    out = bias.copy()
    for h in range(n_heads):
        for d in range(head_dim):
            acc = np.float32(0.0)
            for r in range(rank):
                acc += wv[h, d, r] * o_lat[h, r]
            out[h * head_dim + d] += acc
    return out


@njit(fastmath=True, cache=True)
def mha_attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, end: int, scale: float) -> np.ndarray:
    """One query q (H, D) over cached keys and values (H, S, D) per head: (H*D,)."""
    n_heads, head_dim = q.shape
    scores = np.empty((n_heads, end), np.float32)
    for h in range(n_heads):
        for s in range(end):
            acc = np.float32(0.0)
            for d in range(head_dim):
                acc += q[h, d] * k[h, s, d]
            scores[h, s] = acc * scale
    probs = softmax_rows(scores)
    out = np.zeros(n_heads * head_dim, np.float32)
    for h in range(n_heads):
        for s in range(end):
            p = probs[h, s]
            for d in range(head_dim):
                out[h * head_dim + d] += p * v[h, s, d]
    return out


@njit(fastmath=True, cache=True)
def rotate_onto_keys(q: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Rotated query q (H, D) onto W^Kr (H, D, R): the (H D, R) rows u, v of post_rope_scores.

    Row (h, i) is qa_i W_h[i] + qb_i W_h[i + D/2] and row (h, D/2 + i) is qb_i W_h[i] - qa_i W_h[i + D/2],
    so that c_s . row, weighted by cos and sin of position s, sums to q . RoPE_s(W_h c_s).
    """
    n_heads, head_dim, rank = w.shape
    half = head_dim // 2
    out = np.empty((n_heads * head_dim, rank), np.float32)
    for h in range(n_heads):
        for i in range(half):
            qa, qb = q[h, i], q[h, half + i]
            top, bottom = h * head_dim + i, h * head_dim + half + i
            for r in range(rank):
                w1, w2 = w[h, i, r], w[h, half + i, r]
                out[top, r] = qa * w1 + qb * w2
                out[bottom, r] = qb * w1 - qa * w2
    return out


@njit(fastmath=True, cache=True)
def post_rope_combine(ab: np.ndarray, cos_sin: np.ndarray, ab0: np.ndarray, scale: float) -> np.ndarray:
    """Scores (H, S) = scale * sum_d (ab[s, h, d] + ab0[h, d]) cos_sin[s, d]; ab (S, H D), ab0 the bias's (H, D)."""
    n_heads, head_dim = ab0.shape
    scores = np.empty((n_heads, ab.shape[0]), np.float32)
    for s in range(ab.shape[0]):
        for h in range(n_heads):
            acc = np.float32(0.0)
            for j in range(head_dim):
                acc += (ab[s, h * head_dim + j] + ab0[h, j]) * cos_sin[s, j]
            scores[h, s] = acc * scale
    return scores


# int8 weights (quant.py), stored as rows (out, in): one dot product per output over contiguous bytes, which
# numba vectorizes; measured 1.3-2.1x faster than the fp32 kernels above on 2 cores (BENCHMARKS.md)


@njit(fastmath=True, cache=True, inline="always")
def _dot_q8(x: np.ndarray, row: np.ndarray) -> np.float32:
    acc = np.float32(0.0)
    for c in range(row.shape[0]):
        acc += x[c] * np.float32(row[c])
    return acc


@njit(fastmath=True, cache=True)
def gemv_q8(x: np.ndarray, wq: np.ndarray, scale: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """x (in,) times int8 rows wq (out, in) with scales (out,), plus bias (out,)."""
    out = np.empty(wq.shape[0], np.float32)
    for j in range(wq.shape[0]):
        out[j] = _dot_q8(x, wq[j]) * scale[j] + bias[j]
    return out


@njit(fastmath=True, cache=True)
def routed_experts_q8(
    x: np.ndarray,
    w1: np.ndarray,
    s1: np.ndarray,
    w2: np.ndarray,
    s2: np.ndarray,
    idx: np.ndarray,
    gates: np.ndarray,
    y: np.ndarray,
    swiglu: bool,
) -> None:
    """routed_experts with int8 rows: w1 (E, h, C), w2 (E, C, h'), scales s1 (E, h), s2 (E, C)."""
    width, n_out, hidden = w1.shape[1], w2.shape[1], w2.shape[2]
    h = np.empty(width, np.float32)
    for k in range(idx.shape[0]):
        e = idx[k]
        for j in range(width):
            h[j] = _dot_q8(x, w1[e, j]) * s1[e, j]
        _activate(h, hidden, gates[k], swiglu)
        for c in range(n_out):
            y[c] += _dot_q8(h[:hidden], w2[e, c]) * s2[e, c]


@njit(fastmath=True, cache=True)
def lm_head_q8(h: np.ndarray, wq: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Logits h (C,) times the int8 embedding rows wq (V, C) with scales (V,).

    NOTE: one core. A numba parallel loop here was 3.8x faster than numpy's fp32 BLAS alone, but its worker
    threads keep spinning after the loop and starve the BLAS call of the next step's post-RoPE scores
    (moe-mla-rope decoded at 0.5x fp32); the BLAS LM head it replaces is the one place fp32 uses every core.
    """
    out = np.empty(wq.shape[0], np.float32)
    for v in range(wq.shape[0]):
        out[v] = _dot_q8(h, wq[v]) * scale[v]
    return out
