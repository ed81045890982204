"""Causal self-attention: standard multi-head (Eq. 5-6) and Multi-head Latent Attention (Eq. 13-14)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moemla.config import ModelConfig
from moemla.model.kv_cache import KVCache
from moemla.model.rope import apply_rope

Rope = tuple[torch.Tensor, torch.Tensor] | None  # cos, sin of positions 0..S-1, (S, D/2) each


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, dropout: float) -> torch.Tensor:
    """q (B, H, T, D) at positions start..start+T-1 attends to k, v (B, H, start+T, D); out (B, H, T, D)."""
    t, s = q.shape[2], k.shape[2]
    if t == 1:  # one new token sees the whole prefix: no mask needed
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
    if start == 0:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
    # a chunk after a cached prefix: query i sits at absolute position start + i
    mask = torch.arange(s, device=q.device)[None, :] <= torch.arange(start, start + t, device=q.device)[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)


class MHA(nn.Module):
    """Standard multi-head attention; caches K and V for every head."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.dropout = cfg.n_heads, cfg.head_dim, cfg.dropout
        self.wqkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=cfg.bias)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=cfg.bias)

    def forward(self, x: torch.Tensor, rope: Rope, cache: KVCache | None, layer: int) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.wqkv(x).view(b, t, 3, self.n_heads, self.head_dim).unbind(2)  # (B, T, H, D) each
        start = 0 if cache is None else cache.length
        if rope is not None:
            cos, sin = rope[0][start:], rope[1][start:]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # cached keys are stored rotated
        if cache is not None:
            kv = cache.append(layer, k=k, v=v)
            k, v = kv["k"], kv["v"]  # (B, S, H, D), S = start + T
        dropout = self.dropout if self.training else 0.0
        y = causal_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), start, dropout)
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))


class MLA(nn.Module):
    """Multi-head Latent Attention as the paper's Eq. 13-14; caches only the latents C^K and C^V."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.dropout = cfg.n_heads, cfg.head_dim, cfg.dropout
        self.rank = cfg.kv_lora_rank
        self.wq = nn.Linear(cfg.dim, cfg.dim, bias=cfg.bias)
        # W^Kc and W^Vc (d -> r each, shared across heads) fused into one matmul
        self.wkv_a = nn.Linear(cfg.dim, 2 * self.rank, bias=cfg.bias)
        # W_h^Kr and W_h^Vr for all heads at once (r -> H * D)
        self.wk_b = nn.Linear(self.rank, cfg.dim, bias=cfg.bias)
        self.wv_b = nn.Linear(self.rank, cfg.dim, bias=cfg.bias)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=cfg.bias)

    def forward(self, x: torch.Tensor, rope: Rope, cache: KVCache | None, layer: int) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.n_heads, self.head_dim)  # (B, T, H, D)
        c_k, c_v = self.wkv_a(x).split(self.rank, dim=-1)  # (B, T, R) each
        start = 0
        if cache is not None:
            start = cache.length
            kv = cache.append(layer, c_k=c_k, c_v=c_v)
            c_k, c_v = kv["c_k"], kv["c_v"]  # (B, S, R), S = start + T
        s = c_k.shape[1]
        k = self.wk_b(c_k).view(b, s, self.n_heads, self.head_dim)  # (B, S, H, D)
        v = self.wv_b(c_v).view(b, s, self.n_heads, self.head_dim)
        if rope is not None:
            # §3.1: RoPE after the head-specific up-projection, so every cached key is rotated
            # again when re-expanded (the DeepSeek-V2 report's reason to decouple RoPE).
            cos, sin = rope
            q = apply_rope(q, cos[start:], sin[start:])
            k = apply_rope(k, cos, sin)
        dropout = self.dropout if self.training else 0.0
        y = causal_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), start, dropout)
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))
