"""Causal self-attention: standard multi-head (Eq. 5-6) and Multi-head Latent Attention (Eq. 13-14)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from moemla.config import NORM_EPS, ModelConfig
from moemla.model.dropout import causal_attention_dropout
from moemla.model.dropout import fast as fast_dropout
from moemla.model.kv_cache import Write
from moemla.model.rope import apply_rope


class Angles(NamedTuple):
    """RoPE angles: of the T new queries (and the keys written with them), and of every key slot 0..S-1."""

    q_cos: torch.Tensor  # (T, D/2)
    q_sin: torch.Tensor
    k_cos: torch.Tensor  # (S, D/2)
    k_sin: torch.Tensor


Rope = Angles | None


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """q (B, H, T, D) attends to k, v (B, H, S, D); out (B, H, T, D).

    mask (B, T, S) from KVCache.key_mask says which slots each query reads. Without one (no cache, or a cache
    write with nothing padded, see KVCache.write): T queries from slot 0 are causal (query i reads keys 0..i),
    and one new query reads every slot.
    """
    if mask is None and q.shape[2] == k.shape[2] > 1 and fast_dropout(q, dropout, True):  # CPU training
        return causal_attention_dropout(q, k, v, dropout)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=q.shape[2] > 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], dropout_p=dropout)


def post_rope_scores(
    q: torch.Tensor, c_k: torch.Tensor, w_k: torch.Tensor, b_k: torch.Tensor | None, rope: Rope
) -> torch.Tensor:
    """Scores (B, H, S) of rotated queries q (B, H, D) against keys k_s = R_s (W_h^Kr c_s + b_h), c_k (B, S, R).

    RoPE after the up-projection blocks absorbing W^Kr into the query (DeepSeek-V2 §2.1.3), but the
    rotation can move onto the weights: with pairs (i, i + D/2), q . R_s k_s = sum_i cos_si A_si + sin_si B_si,
    where A_i = qa_i k1_i + qb_i k2_i and B_i = qb_i k1_i - qa_i k2_i are linear in c_s. One matmul of C^K
    gives every A and B: the FLOPs of re-expanding K, without materializing and rotating S x H x D keys.
    """
    b, h, d = q.shape
    s, half = c_k.shape[1], d // 2
    qa, qb = q[..., :half, None], q[..., half:, None]  # (B, H, D/2, 1)
    w1, w2 = w_k[:, :half], w_k[:, half:]  # (H, D/2, R) each
    uv = torch.cat([qa * w1 + qb * w2, qb * w1 - qa * w2], dim=2)  # (B, H, D, R)
    ab = (c_k @ uv.flatten(1, 2).transpose(1, 2)).view(b, s, h, d)  # (B, S, H, D): every A and B
    cos_sin = torch.cat([rope.k_cos[:s], rope.k_sin[:s]], dim=-1)  # (S, D): [cos | sin]
    scores = torch.einsum("bshd,sd->bhs", ab, cos_sin)
    if b_k is not None:  # the bias of W^Kr turns with the position too
        b1, b2 = b_k.view(h, 2, half, 1).unbind(1)
        ab0 = torch.cat([qa * b1 + qb * b2, qb * b1 - qa * b2], dim=2)[..., 0]  # (B, H, D)
        scores = scores + ab0 @ cos_sin.T
    return scores


def latents(entries: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """An MLA layer's cache entries (cache_spec's names) as (C^K, C^V, k_pe): a joint latent is both C^K and C^V."""
    c_k = entries["c_kv"] if "c_kv" in entries else entries["c_k"]
    c_v = entries["c_kv"] if "c_kv" in entries else entries["c_v"]
    return c_k, c_v, entries.get("k_pe")


class MHA(nn.Module):
    """Standard multi-head attention; caches K and V for every head."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.dropout = cfg.n_heads, cfg.head_dim, cfg.dropout
        self.wqkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=cfg.bias)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=cfg.bias)

    def project(self, x: torch.Tensor, q_cos: torch.Tensor | None, q_sin: torch.Tensor | None) -> tuple:
        """x (B, T, C) -> q (B, T, H, D) and the new tokens' cache entries {k, v} (B, T, H, D), keys rotated at
        the new positions (q_cos, q_sin (T, D/2); None without RoPE). The torch model and the ONNX graph call it."""
        b, t, _ = x.shape
        q, k, v = self.wqkv(x).view(b, t, 3, self.n_heads, self.head_dim).unbind(2)  # (B, T, H, D) each
        if q_cos is not None:
            q, k = apply_rope(q, q_cos, q_sin), apply_rope(k, q_cos, q_sin)  # keys cached rotated
        return q, {"k": k, "v": v}

    def forward(self, x: torch.Tensor, rope: Rope, at: Write | None, layer: int) -> torch.Tensor:
        b, t, _ = x.shape
        q, new = self.project(x, *((rope.q_cos, rope.q_sin) if rope is not None else (None, None)))
        k, v = new["k"], new["v"]
        mask = None
        if at is not None:
            kv = at.cache.append(layer, at, k=k, v=v)
            k, v = kv["k"], kv["v"]  # (B, S, H, D), S = the write's span
            mask = at.mask
        dropout = self.dropout if self.training else 0.0
        y = causal_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout, mask)
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))


class MLA(nn.Module):
    """Multi-head Latent Attention as the paper's Eq. 13-14; caches only the latents C^K and C^V.

    With rope_mode="decoupled" (DeepSeek-V2 §2.1.3) each query head gets P extra RoPE channels and
    one RoPE key of P channels, shared by all heads, is cached beside the latents.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.dropout = cfg.n_heads, cfg.head_dim, cfg.dropout
        self.rank = cfg.kv_lora_rank
        self.decoupled = cfg.decoupled
        self.joint = cfg.latent == "joint"
        self.rope_dim = cfg.rope_dim if cfg.decoupled else 0  # P
        h, p = cfg.n_heads, self.rope_dim
        self.wq = nn.Linear(cfg.dim, h * (self.head_dim + p), bias=cfg.bias)
        # W^Kc and W^Vc (d -> r each, shared across heads), or one W^KVc (d -> r) for a joint latent, and the
        # shared RoPE key, fused into one matmul
        self.wkv_a = nn.Linear(cfg.dim, (1 if self.joint else 2) * self.rank + p, bias=cfg.bias)
        # DeepSeek-V2 §2.1.2: the joint latent is RMS-normalised before it is cached and up-projected
        self.kv_norm = nn.RMSNorm(self.rank, eps=NORM_EPS) if self.joint else None
        # W_h^Kr and W_h^Vr for all heads at once (r -> H * D)
        self.wk_b = nn.Linear(self.rank, cfg.dim, bias=cfg.bias)
        self.wv_b = nn.Linear(self.rank, cfg.dim, bias=cfg.bias)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=cfg.bias)

    def project(self, x: torch.Tensor, q_cos: torch.Tensor | None, q_sin: torch.Tensor | None) -> tuple:
        """x (B, T, C) -> q (B, T, H, D), q_pe (B, T, H, P) rotated, and the new tokens' cache entries (cache_spec's
        names: c_k, c_v or the joint c_kv, (B, T, R); k_pe (B, T, P) rotated). The torch model and the ONNX graph
        call it; `latents` reads the entries back as (C^K, C^V, k_pe)."""
        b, t, _ = x.shape
        h, d, p, r = self.n_heads, self.head_dim, self.rope_dim, self.rank
        q, q_pe = self.wq(x).view(b, t, h, d + p).split([d, p], dim=-1)  # (B, T, H, D), (B, T, H, P)
        if self.joint:
            c_kv, k_pe = self.wkv_a(x).split([r, p], dim=-1)  # (B, T, R), (B, T, P)
            new = {"c_kv": self.kv_norm(c_kv)}
        else:
            c_k, c_v, k_pe = self.wkv_a(x).split([r, r, p], dim=-1)  # (B, T, R) x 2, (B, T, P)
            new = {"c_k": c_k, "c_v": c_v}
        if self.decoupled:
            q_pe = apply_rope(q_pe, q_cos, q_sin)
            new["k_pe"] = apply_rope(k_pe[:, :, None], q_cos, q_sin)[:, :, 0]  # one key for all heads, rotated
        return q, q_pe, new

    def forward(self, x: torch.Tensor, rope: Rope, at: Write | None, layer: int) -> torch.Tensor:
        b, t, _ = x.shape
        h, d, p = self.n_heads, self.head_dim, self.rope_dim
        q, q_pe, new = self.project(x, *((rope.q_cos, rope.q_sin) if rope is not None else (None, None)))
        c_k, c_v, k_pe = latents(new)
        mask = None
        if at is not None:
            c_k, c_v, k_pe = latents(at.cache.append(layer, at, **new))  # (B, S, R), S = the write's span
            mask = at.mask
            if t == 1 and at.cache.absorbed and not self.training:  # one-token steps attend over the latents
                return self.decode_absorbed(q, q_pe, c_k, c_v, k_pe, rope, None if mask is None else mask[:, 0])
        s = c_k.shape[1]
        k = self.wk_b(c_k).view(b, s, h, d)  # (B, S, H, D)
        v = self.wv_b(c_v).view(b, s, h, d)
        if self.decoupled:
            q = torch.cat([q, q_pe], dim=-1)  # (B, T, H, D + P)
            k = torch.cat([k, k_pe[:, :, None].expand(b, s, h, p)], dim=-1)
        elif rope is not None:
            # §3.1: RoPE after the head-specific up-projection, so every cached key is rotated
            # again when re-expanded (the DeepSeek-V2 report's reason to decouple RoPE).
            q = apply_rope(q, rope.q_cos, rope.q_sin)
            k = apply_rope(k, rope.k_cos[:s], rope.k_sin[:s])
        dropout = self.dropout if self.training else 0.0
        y = causal_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout, mask)
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))

    def decode_absorbed(
        self,
        q: torch.Tensor,
        q_pe: torch.Tensor,
        c_k: torch.Tensor,
        c_v: torch.Tensor,
        k_pe: torch.Tensor | None,
        rope: Rope,
        key_ok: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One new token (q (B, 1, H, D)) over S cached latents without expanding V or K; key_ok (B, S): the
        slots it reads (None: all)."""
        b = c_k.shape[0]
        h, d = self.n_heads, self.head_dim
        if self.decoupled or rope is None:
            # W_h^Kr moves onto the query: q_h . (W_h^Kr c) = (W_h^Kr^T q_h) . c, scored against C^K directly.
            # The bias of W^Kr adds q_h . b_h to every position alike, which the softmax ignores.
            q_lat = (q[:, 0].transpose(0, 1) @ self.wk_b.weight.view(h, d, self.rank)).transpose(0, 1)  # (B, H, R)
            scores = q_lat @ c_k.transpose(1, 2)  # (B, H, S)
            if k_pe is not None:
                scores = scores + q_pe[:, 0] @ k_pe.transpose(1, 2)  # the decoupled RoPE channels
            scale = (d + self.rope_dim) ** -0.5
        else:
            # RoPE after the up-projection blocks absorbing W^Kr (see post_rope_scores)
            q = apply_rope(q, rope.q_cos, rope.q_sin)[:, 0]  # (B, H, D)
            scores = post_rope_scores(q, c_k, self.wk_b.weight.view(h, d, self.rank), self.wk_b.bias, rope)
            scale = d**-0.5
        if key_ok is not None:
            scores = scores.masked_fill(~key_ok[:, None, :], float("-inf"))
        probs = (scores * scale).softmax(dim=-1)  # (B, H, S)
        o_lat = probs @ c_v  # (B, H, R): attention over the V latents, before W^Vr
        # W_h^Vr applied once to the attended latent, not to every cached position (softmax rows sum to 1,
        # so its bias passes through once). NOTE: folding W^Vr into W^O as one (H * R, C) matrix would read
        # H * R * C weights per step instead of H * D * R + C * C: more bytes whenever R > D H / (H - 1), as here.
        w_v = self.wv_b.weight.view(h, d, self.rank)  # (H, D, R)
        o = (w_v @ o_lat.permute(1, 2, 0)).permute(2, 0, 1)  # (H, D, R) @ (H, R, B) -> (B, H, D)
        if self.wv_b.bias is not None:
            o = o + self.wv_b.bias.view(h, d)
        return self.wo(o.reshape(b, 1, h * d))  # (B, 1, C)
