"""The CPU engine's layers in numpy: the model's math for one sequence, weights in the layout numpy streams
fastest, (in, out), or as int8 rows (quant.py); one-token steps through the numba kernels when given.
Same math as moemla.model (a test holds every variant's logits to it within 1e-4).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType
from typing import NamedTuple

import numpy as np
from scipy.special import erf

from moemla.config import LAYER_NORM_EPS, NORM_EPS, ModelConfig
from moemla.inference.cpu.quant import matmul, quantize_layer, to_int8

Weights = Mapping[str, np.ndarray]


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float = LAYER_NORM_EPS) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = np.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float = NORM_EPS) -> np.ndarray:
    return x / np.sqrt(np.square(x).mean(-1, keepdims=True) + np.float32(eps)) * weight  # as nn.RMSNorm


def norm(x: np.ndarray, params: tuple[np.ndarray, np.ndarray | None]) -> np.ndarray:
    """The block's norm from its weights: LayerNorm (weight, bias) or RMSNorm (weight, None); make_norm's choice."""
    weight, bias = params
    return rms_norm(x, weight) if bias is None else layer_norm(x, weight, bias)


def gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + erf(x * np.float32(0.7071067811865476)))  # exact (erf) GELU, as F.gelu


def activate(h: np.ndarray, kind: str) -> np.ndarray:
    """model.moe.activate: GELU, or SwiGLU over h's [gate | up] halves."""
    if kind == "gelu":
        return gelu(h)
    gate, up = np.split(h, 2, axis=-1)
    return gate / (np.float32(1.0) + np.exp(-gate)) * up


def score(logits: np.ndarray, kind: str) -> np.ndarray:
    """model.moe.score: softmax over the experts, or an independent sigmoid each."""
    return softmax(logits) if kind == "softmax" else np.float32(1.0) / (np.float32(1.0) + np.exp(-logits))


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


class Rope(NamedTuple):
    cos: np.ndarray  # (max_len, D/2)
    sin: np.ndarray  # (max_len, D/2)
    cos_sin: np.ndarray  # (max_len, D): [cos | sin], what post-RoPE scores weigh their terms with


def rope_tables(dim: int, max_len: int, base: float) -> Rope:
    """The angle tables, computed in float64 like moemla.model.rope."""
    inv_freq = base ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
    angles = np.outer(np.arange(max_len, dtype=np.float64), inv_freq)
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    return Rope(cos, sin, np.concatenate([cos, sin], axis=1))


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x (T, H, D) at positions with angle tables (T, D/2): the half-split rotation of model.rope."""
    x1, x2 = np.split(x, 2, axis=-1)
    cos, sin = cos[:, None], sin[:, None]
    return np.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def causal_mask(t: int, start: int) -> np.ndarray | None:
    """Additive mask (T, start + T) for queries at start..start+T-1; None for one query."""
    if t == 1:
        return None
    allowed = np.arange(start + t)[None, :] <= np.arange(start, start + t)[:, None]
    return np.where(allowed, np.float32(0), np.float32(-np.inf))


class Linear:
    """y = x W^T + b with W stored transposed and contiguous, (in, out)."""

    def __init__(self, w: Weights, name: str, bias: bool = True) -> None:
        self.wt = np.ascontiguousarray(w[f"{name}.weight"].T)
        self.wq: np.ndarray | None = None  # int8 rows (out, in) once quantized (quant.py); wt is then None
        self.scale: np.ndarray | None = None
        self.b = w.get(f"{name}.bias") if bias else None
        self.b0 = np.zeros(self.wt.shape[1], np.float32) if self.b is None else self.b  # for the kernels

    def __call__(self, x: np.ndarray) -> np.ndarray:
        y = matmul(x, self.wt, self.wq, self.scale)
        return y if self.b is None else y + self.b


class Fused:
    """Projections of one input as one matrix product, split after: one weight stream instead of several."""

    def __init__(self, parts: list[Linear]) -> None:
        self.wt = np.concatenate([part.wt for part in parts], axis=1)  # (in, sum of outs)
        self.wq: np.ndarray | None = None
        self.scale: np.ndarray | None = None
        self.b = None
        if any(part.b is not None for part in parts):
            self.b = np.concatenate(
                [np.zeros(part.wt.shape[1], np.float32) if part.b is None else part.b for part in parts]
            )
        self.ends = np.cumsum([part.wt.shape[1] for part in parts])[:-1]
        self.b0 = np.zeros(self.wt.shape[1], np.float32) if self.b is None else self.b

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        y = matmul(x, self.wt, self.wq, self.scale)
        return np.split(y if self.b is None else y + self.b, self.ends, axis=-1)


class Block:
    """One decoder block's weights and its slice of the cache."""

    def __init__(self, cfg: ModelConfig, w: Weights, i: int, max_len: int, kernels: ModuleType | None) -> None:
        p = f"blocks.{i}."
        self.cfg, self.kernels = cfg, kernels  # kernels: moemla.inference.cpu.kernels for one-token steps, or None
        self.ln1 = (w[p + "ln1.weight"], w.get(p + "ln1.bias"))  # no bias: RMSNorm
        self.ln2 = (w[p + "ln2.weight"], w.get(p + "ln2.bias"))
        h, d, r = cfg.n_heads, cfg.head_dim, cfg.kv_lora_rank
        self.wo = Linear(w, p + "attn.wo")
        if cfg.attention == "mha":
            self.wqkv = Linear(w, p + "attn.wqkv")
            self.k = np.zeros((h, max_len, d), np.float32)  # per head, so each head's keys are contiguous
            self.v = np.zeros((h, max_len, d), np.float32)
        else:
            self.wq_kv_a = Fused([Linear(w, p + "attn.wq"), Linear(w, p + "attn.wkv_a")])  # both read ln1(x)
            self.wk = w[p + "attn.wk_b.weight"].reshape(h, d, r)  # W_h^Kr (H, D, R)
            self.wv = w[p + "attn.wv_b.weight"].reshape(h, d, r)  # W_h^Vr (H, D, R)
            self.bk, self.bv = w.get(p + "attn.wk_b.bias"), w.get(p + "attn.wv_b.bias")
            self.bv0 = np.zeros(h * d, np.float32) if self.bv is None else self.bv  # for the kernels
            self.no_bias_terms = np.zeros((h, d), np.float32)
            p_dim = cfg.rope_dim if cfg.decoupled else 0
            # one RMS-normalised latent is both C^K and C^V (latent joint: DeepSeek's), or one each (the paper's)
            self.kv_norm = w.get(p + "attn.kv_norm.weight")
            if self.kv_norm is not None:
                self.cache = {"c_kv": np.zeros((max_len, r), np.float32)}
                self.c_k = self.c_v = self.cache["c_kv"]
            else:
                self.cache = {"c_k": np.zeros((max_len, r), np.float32), "c_v": np.zeros((max_len, r), np.float32)}
                self.c_k, self.c_v = self.cache["c_k"], self.cache["c_v"]
            self.pe_at = r if self.kv_norm is not None else 2 * r  # where k_pe starts in W^KV_a's output
            self.cache["k_pe"] = np.zeros((max_len, p_dim), np.float32)
        if cfg.ffn == "dense":
            self.w1, self.w2 = Linear(w, p + "ffn.w1"), Linear(w, p + "ffn.w2")
        else:
            # the router and the shared experts' first projection both read ln2(x): one product.
            # The router's "bias" is Algorithm 1's balancing bias b, not an affine term.
            parts = [Linear(w, p + "ffn.router", bias=False)]
            self.router_shared = Fused(parts + ([Linear(w, p + "ffn.shared.w1")] if cfg.n_shared_experts else []))
            self.router_bias = w[p + "ffn.router.bias"]
            self.e1 = np.ascontiguousarray(w[p + "ffn.experts.w1"])  # (E, C, h)
            self.e2 = np.ascontiguousarray(w[p + "ffn.experts.w2"])  # (E, h, C)
            self.s1 = self.s2 = None  # once int8: e1 (E, h, C) and e2 (E, C, h) as rows, scales (E, h), (E, C)
            self.shared = None
            if cfg.n_shared_experts:
                self.shared = Linear(w, p + "ffn.shared.w2")

    def __call__(self, x: np.ndarray, start: int, rope: Rope | None) -> np.ndarray:
        """x (T, C) at positions start..start+T-1 -> (T, C); writes this block's cache."""
        if self.kernels is not None and x.shape[0] == 1:
            return self.step(x[0], start, rope)[None]
        attend = self.mha if self.cfg.attention == "mha" else self.mla
        x = x + attend(norm(x, self.ln1), start, rope)
        h = norm(x, self.ln2)
        act = self.cfg.ffn_activation
        return x + (self.w2(activate(self.w1(h), act)) if self.cfg.ffn == "dense" else self.moe(h))

    def step(self, x: np.ndarray, pos: int, rope: Rope | None) -> np.ndarray:
        """One token x (C,) at position pos through the compiled kernels: the same math as __call__."""
        cfg, kern, end = self.cfg, self.kernels, pos + 1
        h, d = cfg.n_heads, cfg.head_dim
        cos_sin = (rope.cos[pos], rope.sin[pos]) if rope is not None else None
        a = self.norm_step(x, self.ln1)
        if cfg.attention == "mha":
            q, k, v = self.gemv(a, self.wqkv).reshape(3, h, d)
            if cos_sin is not None:
                q, k = kern.rope_rows(q, *cos_sin), kern.rope_rows(k, *cos_sin)
            self.k[:, pos], self.v[:, pos] = k, v
            o = kern.mha_attend(q, self.k, self.v, end, d**-0.5)
        else:
            r, p = cfg.kv_lora_rank, (cfg.rope_dim if cfg.decoupled else 0)
            qkv = self.gemv(a, self.wq_kv_a)
            q, kv = qkv[: h * (d + p)].reshape(h, d + p), qkv[h * (d + p) :]
            c = self.cache
            if self.kv_norm is not None:
                self.c_k[pos] = kern.rms_norm(np.ascontiguousarray(kv[:r]), self.kv_norm, NORM_EPS)
            else:
                self.c_k[pos], self.c_v[pos] = kv[:r], kv[r : 2 * r]
            if cfg.positions == "rope" and not cfg.decoupled:  # post-RoPE, as post_rope_scores
                q_rot = kern.rope_rows(np.ascontiguousarray(q), *cos_sin)
                uv = kern.rotate_onto_keys(q_rot, self.wk)  # (H D, R)
                ab = self.c_k[:end] @ uv.T  # (S, H D): the one product that grows with S (numpy's BLAS)
                ab0 = self.no_bias_terms  # (H, D) zeros
                if self.bk is not None:
                    ab0 = kern.rotate_onto_keys(q_rot, self.bk.reshape(h, d, 1)).reshape(h, d)
                scores = kern.post_rope_combine(ab, rope.cos_sin, ab0, d**-0.5)
            else:
                q_pe = self.no_bias_terms[:, :0]  # (H, 0): no decoupled channels
                if p:
                    c["k_pe"][pos] = kern.rope_rows(kv[None, self.pe_at :], *cos_sin)[0]
                    q_pe = kern.rope_rows(np.ascontiguousarray(q[:, d:]), *cos_sin)
                scores = kern.absorbed_scores(q[:, :d], q_pe, self.wk, self.c_k, c["k_pe"], end, (d + p) ** -0.5)
            o = kern.latent_values(scores, self.c_v, self.wv, self.bv0)
        x = x + self.gemv(o, self.wo)
        a = self.norm_step(x, self.ln2)
        swiglu = cfg.ffn_activation == "swiglu"
        act = kern.swiglu if swiglu else kern.gelu
        if cfg.ffn == "dense":
            return x + self.gemv(act(self.gemv(a, self.w1)), self.w2)
        both = self.gemv(a, self.router_shared)
        logits, shared = both[: cfg.n_routed_experts], both[cfg.n_routed_experts :]
        y = np.zeros_like(x) if self.shared is None else self.gemv(act(shared), self.shared)
        sigmoid = cfg.scoring == "sigmoid"
        idx, gates = kern.route(logits, self.router_bias, cfg.n_activated_experts, cfg.bias_in_gate, sigmoid)
        if self.s1 is None:
            kern.routed_experts(a, self.e1, self.e2, idx, gates, y, swiglu)
        else:
            kern.routed_experts_q8(a, self.e1, self.s1, self.e2, self.s2, idx, gates, y, swiglu)
        return x + y

    def norm_step(self, x: np.ndarray, params: tuple[np.ndarray, np.ndarray | None]) -> np.ndarray:
        weight, bias = params
        if bias is None:
            return self.kernels.rms_norm(x, weight, NORM_EPS)
        return self.kernels.layer_norm(x, weight, bias, LAYER_NORM_EPS)

    def mha(self, x: np.ndarray, start: int, rope: Rope | None) -> np.ndarray:
        t, (h, d) = x.shape[0], (self.cfg.n_heads, self.cfg.head_dim)
        q, k, v = np.split(self.wqkv(x).reshape(t, 3, h, d), 3, axis=1)  # (T, 1, H, D) each
        q, k, v = q[:, 0], k[:, 0], v[:, 0]
        if rope is not None:
            cos, sin = rope.cos[start : start + t], rope.sin[start : start + t]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        end = start + t
        self.k[:, start:end], self.v[:, start:end] = k.transpose(1, 0, 2), v.transpose(1, 0, 2)
        scores = q.transpose(1, 0, 2) @ self.k[:, :end].transpose(0, 2, 1) * np.float32(d**-0.5)  # (H, T, S)
        o = softmax(_masked(scores, t, start)) @ self.v[:, :end]  # (H, T, D)
        return self.wo(o.transpose(1, 0, 2).reshape(t, h * d))

    def mla(self, x: np.ndarray, start: int, rope: Rope | None) -> np.ndarray:
        """Eq. 13-14 over the cached latents: W^Kr moves onto the query where RoPE allows, W^Vr after attention."""
        cfg, t, end = self.cfg, x.shape[0], start + x.shape[0]
        h, d, r = cfg.n_heads, cfg.head_dim, cfg.kv_lora_rank
        p = cfg.rope_dim if cfg.decoupled else 0
        q, kv = self.wq_kv_a(x)
        q = q.reshape(t, h, d + p)
        c = self.cache
        if self.kv_norm is not None:
            self.c_k[start:end] = rms_norm(kv[:, :r], self.kv_norm)
        else:
            self.c_k[start:end], self.c_v[start:end] = kv[:, :r], kv[:, r : 2 * r]
        q_nope = q[..., :d]
        if cfg.positions == "rope" and not cfg.decoupled and t == 1:
            scores = self.post_rope_scores(apply_rope(q_nope, rope.cos[start:end], rope.sin[start:end])[0], end, rope)
            scores = scores[:, None] * np.float32(d**-0.5)  # (H, 1, S)
        elif cfg.positions == "rope" and not cfg.decoupled:
            # the paper's post-projection RoPE: keys re-expanded from C^K and rotated (prefill chunks)
            cos, sin = rope.cos, rope.sin
            k = (self.wk @ self.c_k[:end].T).transpose(2, 0, 1)  # (H, D, R) @ (R, S) -> (S, H, D)
            k = apply_rope(k if self.bk is None else k + self.bk.reshape(h, d), cos[:end], sin[:end])
            q_rot = apply_rope(q_nope, cos[start:end], sin[start:end])
            scores = q_rot.transpose(1, 0, 2) @ k.transpose(1, 2, 0) * np.float32(d**-0.5)  # (H, T, S)
        else:
            q_lat = q_nope.transpose(1, 0, 2) @ self.wk  # (H, T, D) @ (H, D, R) -> (H, T, R)
            scores = q_lat @ self.c_k[:end].T  # (H, T, S); W^Kr's bias shifts a row alike: softmax ignores it
            if cfg.decoupled:
                cos, sin = rope.cos[start:end], rope.sin[start:end]
                c["k_pe"][start:end] = apply_rope(kv[:, None, self.pe_at :], cos, sin)[:, 0]
                q_pe = apply_rope(q[..., d:], cos, sin)  # (T, H, P)
                scores = scores + q_pe.transpose(1, 0, 2) @ c["k_pe"][:end].T
            scores = scores * np.float32((d + p) ** -0.5)
        o_lat = softmax(_masked(scores, t, start)) @ self.c_v[:end]  # (H, T, R)
        o = o_lat @ self.wv.transpose(0, 2, 1)  # (H, T, D): W_h^Vr once per query, not per position
        if self.bv is not None:
            o = o + self.bv.reshape(h, 1, d)
        return self.wo(o.transpose(1, 0, 2).reshape(t, h * d))

    def post_rope_scores(self, q: np.ndarray, end: int, rope: Rope) -> np.ndarray:
        """Scores (H, S) of one rotated query q (H, D): moemla.model.attention.post_rope_scores for one sequence.

        The rotation moves onto W^Kr, so the keys are never materialized nor rotated (derivation there).
        """
        h, half = q.shape[0], q.shape[1] // 2
        qa, qb = q[:, :half, None], q[:, half:, None]  # (H, D/2, 1)
        w1, w2 = self.wk[:, :half], self.wk[:, half:]  # (H, D/2, R) each
        uv = np.concatenate([qa * w1 + qb * w2, qb * w1 - qa * w2], axis=1)  # (H, D, R)
        ab = (self.c_k[:end] @ uv.reshape(h * 2 * half, -1).T).reshape(end, h, 2 * half)  # (S, H, D)
        cos_sin = rope.cos_sin[:end]  # (S, D)
        scores = np.einsum("shd,sd->hs", ab, cos_sin)
        if self.bk is not None:  # the bias of W^Kr turns with the position too
            b1, b2 = self.bk.reshape(h, 2, half, 1).transpose(1, 0, 2, 3)  # (H, D/2, 1) each
            ab0 = np.concatenate([qa * b1 + qb * b2, qb * b1 - qa * b2], axis=1)[..., 0]  # (H, D)
            scores = scores + ab0 @ cos_sin.T
        return scores

    def moe(self, x: np.ndarray) -> np.ndarray:
        """Eq. 12: shared experts plus the top-k routed experts of each token, gate-weighted."""
        cfg = self.cfg
        logits, *shared = self.router_shared(x)  # (T, E), and the shared experts' hidden (T, N_s h)
        k = cfg.n_activated_experts
        # paper: gates from softmax(l + b); DeepSeek-V3: b only picks the experts, softmax(l) weights them
        scores = score(logits + self.router_bias if cfg.bias_in_gate else logits, cfg.scoring)
        pick = scores if cfg.bias_in_gate else scores + self.router_bias
        idx = np.argpartition(-pick, k - 1, axis=-1)[:, :k]  # (T, K), any order
        gates = np.take_along_axis(scores, idx, -1)
        gates = gates / gates.sum(-1, keepdims=True)
        act = cfg.ffn_activation
        y = self.shared(activate(shared[0], act)) if self.shared is not None else np.zeros_like(x)
        if x.shape[0] == 1:  # decode: K matrix-vector products, no grouping
            experts = idx[0].tolist()
            hidden = activate(np.concatenate([self.expert(x, e, 1) for e in experts]), act) * gates[0, :, None]
            for k, e in enumerate(experts):
                y += self.expert(hidden[k : k + 1], e, 2)
            return y
        for e in np.unique(idx).tolist():  # prefill: each chosen expert once, over all its tokens
            tokens, slot = np.nonzero(idx == e)
            y[tokens] += gates[tokens, slot, None] * self.expert(activate(self.expert(x[tokens], e, 1), act), e, 2)
        return y

    def expert(self, x: np.ndarray, e: int, which: int) -> np.ndarray:
        """x @ W1[e] (which=1) or x @ W2[e] (which=2), fp32 or int8 with its scales."""
        w, scale = (self.e1, self.s1) if which == 1 else (self.e2, self.s2)
        if scale is None:
            return x @ w[e]
        return matmul(x, None, w[e], scale[e])

    def gemv(self, x: np.ndarray, layer: Linear | Fused) -> np.ndarray:
        """One token through a Linear or Fused layer with the compiled kernels, fp32 or int8."""
        if layer.wq is None:
            return self.kernels.gemv(x, layer.wt, layer.b0)
        return self.kernels.gemv_q8(x, layer.wq, layer.scale, layer.b0)

    def quantize(self) -> None:
        """Every large matrix of this block to int8 with per-output-channel scales (quant.py)."""
        for layer in vars(self).values():
            if isinstance(layer, Linear | Fused) and layer.wq is None:
                quantize_layer(layer)
        if self.cfg.ffn == "moe":  # as rows: (E, h, C) and (E, C, h)
            self.e1, self.s1 = to_int8(self.e1.transpose(0, 2, 1))
            self.e2, self.s2 = to_int8(self.e2.transpose(0, 2, 1))


def _masked(scores: np.ndarray, t: int, start: int) -> np.ndarray:
    mask = causal_mask(t, start)
    return scores if mask is None else scores + mask
