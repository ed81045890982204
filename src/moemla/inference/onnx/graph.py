"""The moemla model as one function ONNX can hold: token ids, an attention mask and the past cache in; logits and
the grown cache out. It reads the Transformer's own parameters and repeats its math with no cache object, so that
`torch.onnx.export` traces a graph with dynamic batch, new-token and past lengths.

The cache keeps the model's layout (`cache_spec`): MHA layers carry K and V per head, MLA layers only the latents
C^K, C^V (and the decoupled RoPE key), so the exported file keeps MLA's memory saving. Two choices are made inside
the graph by the number of new tokens (ONNX If nodes), as TorchDecoder makes them on the host:
- MLA one-token steps attend over the latents with W^Kr and W^Vr absorbed (DeepSeek-V2 §2.1.3); a prefill expands
  K and V once. The paper's RoPE after the up-projection (§3.1) always expands, since the rotation sits between W^Kr
  and the score;
- MoE layers with fewer assignments than experts gather each assignment's expert weights (a decode step reads 6 of
  62 experts); larger batches run every expert on every token under a gate mask (no data-dependent shapes).
tests/test_onnx.py holds the logits to the Transformer's within 1e-4 for every portable variant.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moemla.config import ModelConfig
from moemla.model import Transformer
from moemla.model.attention import MHA, MLA, latents
from moemla.model.kv_cache import cache_spec
from moemla.model.moe import MoE, activate
from moemla.model.rope import apply_rope


def cache_names(cfg: ModelConfig) -> list[str]:
    """The cache tensors in graph order: '{layer}.{name}' for each layer and each name of cache_spec."""
    return [f"{i}.{name}" for i in range(cfg.n_layers) for name in cache_spec(cfg)]


def cache_shape(cfg: ModelConfig, name: str) -> list[int | str]:
    """One cache tensor's shape, "batch" and "past" for the dynamic axes: MHA's K and V as (B, H, S, D), so a step
    multiplies by the cached keys without transposing them; MLA's latents (and RoPE key) as (B, S, R)."""
    per_token = list(cache_spec(cfg)[name.split(".", 1)[1]])  # the model's own elements per token
    return ["batch", per_token[0], "past", *per_token[1:]] if len(per_token) == 2 else ["batch", "past", *per_token]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float) -> torch.Tensor:
    """q (B, T, H, D) over k, v (B, H, S, D) where allowed (B, T, S) -> (B, T, H * D)."""
    scores = (q.transpose(1, 2) @ k.transpose(2, 3)) * scale  # (B, H, T, S)
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)


def mha(attn: MHA, x: torch.Tensor, rope: tuple | None, allowed: torch.Tensor, past: list[torch.Tensor]):
    q, new = attn.project(x, *(rope[:2] if rope is not None else (None, None)))  # the model's own projection
    k, v = torch.cat([past[0], new["k"].transpose(1, 2)], 2), torch.cat([past[1], new["v"].transpose(1, 2)], 2)
    return attn.wo(attend(q, k, v, allowed, attn.head_dim**-0.5)), [k, v]  # the cache as (B, H, S, D)


def mla(attn: MLA, x: torch.Tensor, rope: tuple | None, allowed: torch.Tensor, past: list[torch.Tensor]):
    t = x.shape[1]
    h, d, p = attn.n_heads, attn.head_dim, attn.rope_dim
    q, q_pe, new = attn.project(x, *(rope[:2] if rope is not None else (None, None)))  # the model's own projection
    full = {name: torch.cat([old, new[name]], 1) for old, name in zip(past, new, strict=True)}  # (B, S, ...)
    c_k, c_v, k_pe = latents(full)  # a joint latent is both C^K and C^V
    k_pe = k_pe if k_pe is not None else c_k[..., :0]  # a branch operand must be a tensor
    ops = (q, q_pe, c_k, c_v, k_pe, allowed, *_latent_weights(attn))
    if rope is not None and not attn.decoupled:  # §3.1: RoPE after the up-projection; every key re-rotated
        y = _expanded((h, d, p), *ops, rope=rope)
    else:  # the branches take the weights as operands and capture no module: torch.export traces them faster
        y = torch.cond(t == 1, lambda *o: _absorbed((h, d, p), *o), lambda *o: _expanded((h, d, p), *o), ops)
    return attn.wo(y), list(full.values())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear over rows of x (..., in) -> (..., out) as one Gemm that reads the weight as it is stored: a weight
    used twice (W^Kr, W^Vr, the tied embedding) stays one initializer instead of a transposed copy per use."""
    return F.linear(x.reshape(-1, x.shape[-1]), weight, bias).view(*x.shape[:-1], -1)


def _latent_weights(attn: MLA) -> tuple[torch.Tensor, ...]:
    """W^Kr, its bias, W^Vr, its bias (zeros where the model has none): operands of the branches below."""
    zeros = attn.wk_b.weight.new_zeros(attn.wk_b.weight.shape[0])
    return tuple(w if w is not None else zeros for w in (attn.wk_b.weight, attn.wk_b.bias, attn.wv_b.weight,
                                                         attn.wv_b.bias))  # fmt: skip


def _expanded(shape, q, q_pe, c_k, c_v, k_pe, allowed, w_k, b_k, w_v, b_v, rope=None):
    """Eq. 13-14 as written: K and V re-expanded from the latents, (B, T, H * D). shape: (H, D, P)."""
    h, d, p = shape
    b, s, _ = c_k.shape
    k, v = linear(c_k, w_k, b_k).view(b, s, h, d), linear(c_v, w_v, b_v).view(b, s, h, d)  # (B, S, H, D): prefill
    if p:  # decoupled RoPE channels, one key shared by all heads
        q = torch.cat([q, q_pe], dim=-1)  # (B, T, H, D + P)
        k = torch.cat([k, k_pe[:, :, None].expand(b, s, h, p)], dim=-1)
    elif rope is not None:
        q, k = apply_rope(q, *rope[:2]), apply_rope(k, *rope[2:])
    return attend(q, k.transpose(1, 2), v.transpose(1, 2), allowed, (d + p) ** -0.5)


def _absorbed(shape, q, q_pe, c_k, c_v, k_pe, allowed, w_k, b_k, w_v, b_v):
    """One new token per row over the cached latents, W^Kr on the query and W^Vr after the attention, (B, 1, H * D).

    The per-head blocks W_h (D, R) of W^Kr and W^Vr (C, R) are read through a block mask (H, C) rather than as a
    reshaped copy, so the file holds each matrix once (H times the FLOPs of a tiny matmul). The bias of W^Kr adds
    the same q . b to every key, which the softmax ignores; W^Vr's bias passes once, in its head's block."""
    h, d, p = shape
    block = (torch.arange(h * d, device=q.device) // d == torch.arange(h, device=q.device)[:, None]).to(q.dtype)
    q_lat = (q.flatten(2)[:, :, None, :] * block) @ w_k  # (B, T, H, C) @ (C, R) -> (B, T, H, R)
    scores = q_lat.transpose(1, 2) @ c_k[:, None].transpose(2, 3)  # (B, H, T, R) @ (B, 1, R, S) -> (B, H, T, S)
    if p:
        scores = scores + q_pe.transpose(1, 2) @ k_pe[:, None].transpose(2, 3)  # the decoupled RoPE channels
    scores = (scores * (d + p) ** -0.5).masked_fill(~allowed[:, None], float("-inf"))
    o_lat = scores.softmax(-1) @ c_v[:, None]  # (B, H, T, R)
    # each head's own block of W^Vr (and of its bias): (B, H, T, C) -> (B, T, C)
    return (linear(o_lat, w_v, b_v) * block[:, None, :]).sum(1)


def moe(ffn: MoE, x: torch.Tensor) -> torch.Tensor:
    """Eq. 12 with static shapes: x (B, T, C) -> (B, T, C)."""
    shape = x.shape
    x = x.reshape(-1, shape[-1])  # (N, C)
    gates, idx = ffn.router(x)  # (N, K): the model's own router, in fp32
    n_experts = ffn.experts.n_experts
    y = torch.cond(
        x.shape[0] * gates.shape[1] < n_experts,
        lambda x, gates, idx: _gathered(ffn, x, gates, idx),
        lambda x, gates, idx: _masked(ffn, x, gates, idx),
        (x, gates, idx),
    )
    if ffn.shared is not None:
        y = y + ffn.shared(x)
    return y.view(shape)


def _gathered(ffn: MoE, x: torch.Tensor, gates: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Each assignment's expert weights gathered (N, K, C, h): reads only the chosen experts."""
    n, k = idx.shape
    flat = idx.reshape(-1)  # a Gather on axis 0 (not GatherND): what the int8 export dequantizes row by row
    w1 = ffn.experts.w1.index_select(0, flat).view(n, k, *ffn.experts.w1.shape[1:])  # (N, K, C, h)
    w2 = ffn.experts.w2.index_select(0, flat).view(n, k, *ffn.experts.w2.shape[1:])  # (N, K, h, C)
    hid = activate(x[:, None, None, :] @ w1, ffn.experts.activation)  # (N, K, 1, h)
    y = (hid @ w2)[:, :, 0]  # (N, K, C)
    return (y * gates[..., None].to(y.dtype)).sum(1)


def _masked(ffn: MoE, x: torch.Tensor, gates: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, weighted by a gate that is 0 outside the token's top-k: (N, C)."""
    dense = torch.zeros(x.shape[0], ffn.experts.n_experts, dtype=gates.dtype).scatter(-1, idx, gates)  # (N, E)
    hid = activate(x[None] @ ffn.experts.w1, ffn.experts.activation)  # (E, N, h)
    y = (hid * dense.T[..., None].to(hid.dtype)) @ ffn.experts.w2  # (E, N, C)
    return y.sum(0)


class ExportedLM(nn.Module):
    """(input_ids (B, T), attention_mask (B, P + T), logits_at (B, K), *past) -> (logits (B, K, V), *present), present =
    past + new. logits_at picks the new positions whose logits come out: the last one to generate (a batch-16 prefill
    at xs would otherwise return 16 x T x 50,257 floats), every one to score a text.

    attention_mask marks real tokens (1) and left padding (0) over every slot, past and new; learned positions
    count from each row's first real token, RoPE rotates by slot (scores depend only on distances)."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model.eval()
        self.spec = cache_spec(model.cfg)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_at: torch.Tensor, *past: torch.Tensor
    ):
        m, cfg = self.model, self.model.cfg
        t, p = input_ids.shape[1], past[0].shape[cache_shape(cfg, "0." + next(iter(self.spec))).index("past")]
        slots = torch.arange(p + t, device=input_ids.device)  # (S,)
        q_slots = slots[p:]  # (T,)
        causal = slots[None, :] <= q_slots[:, None]  # (T, S)
        # a padding query reads itself alone, so its row stays finite (and nobody reads it)
        allowed = causal & (attention_mask.bool()[:, None, :] | (slots[None, :] == q_slots[:, None]))  # (B, T, S)
        x = m.wte(input_ids)  # (B, T, C)
        if m.wpe is not None:
            x = x + m.wpe((attention_mask.cumsum(-1) - 1).clamp(min=0)[:, p:])
        rope = None
        if cfg.positions == "rope":
            rope = (m.rope_cos[q_slots], m.rope_sin[q_slots], m.rope_cos[: p + t], m.rope_sin[: p + t])
        present: list[torch.Tensor] = []
        per_layer = len(self.spec)
        for i, block in enumerate(m.blocks):
            layer_past = list(past[i * per_layer : (i + 1) * per_layer])
            run = mla if isinstance(block.attn, MLA) else mha
            h, new = run(block.attn, block.ln1(x), rope, allowed, layer_past)
            x = x + h  # Eq. 11
            z = block.ln2(x)
            x = x + (moe(block.ffn, z) if isinstance(block.ffn, MoE) else block.ffn(z))  # Eq. 12
            present += new
        hid = m.ln_f(x)
        hid = hid.gather(1, logits_at[..., None].expand(-1, -1, hid.shape[-1]))  # (B, K, C)
        logits = F.linear(hid.flatten(0, 1), m.wte.weight).view(*hid.shape[:2], -1)  # tied: the Gather's matrix
        return (logits, *present)
