"""A moemla model (MoE-MLA-RoPE, arXiv 2508.01261) for Hugging Face transformers; needs only torch + transformers.

Written by `moemla export --format hf`; the parameter names are moemla's, under `model.`. The cache keeps what
moemla keeps: K and V per head for MHA, only the latents C^K and C^V (and DeepSeek-V2's shared RoPE key) for MLA.
Left padding is read from `attention_mask`: positions count from each sequence's first real token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

# transformers 5 names the cache `cache`, in forward's arguments and in its outputs; 4.x named it `past_key_values`
CACHE_NAME = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

try:
    from .configuration_moemla import MoemlaConfig
except ImportError:  # loaded as a plain module, outside a package
    from configuration_moemla import MoemlaConfig  # type: ignore[no-redef]


def rope_angles(positions: torch.Tensor, dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (B, T, D/2) of positions (B, T) times theta_i = base^(-2i/D), computed in float64."""
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim)
    angles = positions.double()[..., None] * inv_freq
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + D/2) of x (B, T, H, D) by the angles (B, T, D/2) of each token."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos[:, :, None], sin[:, :, None]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)


def attention_mask_4d(key_ok: torch.Tensor | None, past: int, t: int, device: torch.device) -> torch.Tensor | None:
    """(B, 1, T, S) True where query i (at slot past + i) may read key j; None when plain causal suffices."""
    if key_ok is None and t == 1:
        return None
    q_pos = torch.arange(past, past + t, device=device)
    k_pos = torch.arange(past + t, device=device)
    allowed = k_pos[None, :] <= q_pos[:, None]  # (T, S)
    if key_ok is not None:
        # a padding query reads itself alone, so its row stays finite (and is never read)
        allowed = allowed & (key_ok[:, None, :] | (k_pos[None, :] == q_pos[:, None]))  # (B, T, S)
        return allowed[:, None]
    return allowed[None, None]


class MoemlaMHA(nn.Module):
    def __init__(self, cfg: MoemlaConfig, layer: int) -> None:
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.wqkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=cfg.bias)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=cfg.bias)

    def forward(self, x, rope_q, rope_k, mask, cache):
        b, t, _ = x.shape
        h = self.cfg.n_heads
        q, k, v = self.wqkv(x).view(b, t, 3, h, -1).unbind(2)  # (B, T, H, D) each
        if rope_q is not None:
            q, k = apply_rope(q, *rope_q), apply_rope(k, *rope_q)  # new keys sit at the query positions
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if cache is not None:
            k, v = cache.update(k, v, self.layer)  # (B, H, S, D)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and t > 1)
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))


class MoemlaMLA(nn.Module):
    """Eq. 13-14: keys and values from two shared latents; only the latents are cached."""

    def __init__(self, cfg: MoemlaConfig, layer: int) -> None:
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.decoupled = cfg.positions == "rope" and cfg.rope_mode == "decoupled"
        self.p = cfg.rope_dim if self.decoupled else 0
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * (cfg.dim // cfg.n_heads + self.p), bias=cfg.bias)
        self.wkv_a = nn.Linear(cfg.dim, 2 * cfg.kv_lora_rank + self.p, bias=cfg.bias)
        self.wk_b = nn.Linear(cfg.kv_lora_rank, cfg.dim, bias=cfg.bias)
        self.wv_b = nn.Linear(cfg.kv_lora_rank, cfg.dim, bias=cfg.bias)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=cfg.bias)

    def forward(self, x, rope_q, rope_k, mask, cache):
        b, t, _ = x.shape
        h, r, p = self.cfg.n_heads, self.cfg.kv_lora_rank, self.p
        d = self.cfg.dim // h
        q, q_pe = self.wq(x).view(b, t, h, d + p).split([d, p], dim=-1)  # (B, T, H, D), (B, T, H, P)
        c_k, c_v, k_pe = self.wkv_a(x).split([r, r, p], dim=-1)  # (B, T, R) x 2, (B, T, P)
        if self.decoupled:
            q_pe = apply_rope(q_pe, *rope_q)
            k_pe = apply_rope(k_pe[:, :, None], *rope_q)[:, :, 0]  # one key for all heads, cached rotated
        if cache is not None:
            # the cache's "keys" are [C^K | k_pe] and its "values" C^V, one pseudo-head each: (B, 1, S, R (+P))
            key, val = cache.update(torch.cat([c_k, k_pe], dim=-1)[:, None], c_v[:, None], self.layer)
            (c_k, k_pe), c_v = key[:, 0].split([r, p], dim=-1), val[:, 0]
            if t == 1 and not self.training and (self.decoupled or rope_q is None):
                return self.decode_absorbed(q[:, 0], q_pe[:, 0], c_k, c_v, k_pe, mask)
        s = c_k.shape[1]
        k = self.wk_b(c_k).view(b, s, h, d)  # (B, S, H, D): expanded per step, never cached
        v = self.wv_b(c_v).view(b, s, h, d)
        if self.decoupled:
            q = torch.cat([q, q_pe], dim=-1)
            k = torch.cat([k, k_pe[:, :, None].expand(b, s, h, p)], dim=-1)
        elif rope_q is not None:  # the paper's §3.1: RoPE after the up-projection, cached keys re-rotated
            q, k = apply_rope(q, *rope_q), apply_rope(k, *rope_k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and t > 1)
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))

    def decode_absorbed(self, q, q_pe, c_k, c_v, k_pe, mask):
        """One new token q (B, H, D) over the cached latents c_k, c_v (B, S, R), K and V never expanded.

        W^Kr moves onto the query and W^Vr applies once to the attended latent (DeepSeek-V2 §2.1.3); the bias
        of W^Kr adds the same q . b to every position, which the softmax ignores. Not for the paper's RoPE after
        the up-projection, whose rotation sits between W^Kr and the score.
        """
        b, h = q.shape[:2]
        d, r = self.cfg.dim // h, self.cfg.kv_lora_rank
        q_lat = torch.einsum("bhd,hdr->bhr", q, self.wk_b.weight.view(h, d, r))
        scores = q_lat @ c_k.transpose(1, 2)  # (B, H, S)
        if self.p:
            scores = scores + q_pe @ k_pe.transpose(1, 2)  # the decoupled RoPE channels
        if mask is not None:
            scores = scores.masked_fill(~mask[:, 0, 0, None, :], float("-inf"))
        probs = (scores * (d + self.p) ** -0.5).softmax(dim=-1)
        o = torch.einsum("bhr,hdr->bhd", probs @ c_v, self.wv_b.weight.view(h, d, r))  # (B, H, D)
        if self.wv_b.bias is not None:
            o = o + self.wv_b.bias.view(h, d)
        return self.wo(o.reshape(b, 1, h * d))


class MoemlaMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=bias)
        self.w2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x):
        return self.w2(F.gelu(self.w1(x)))


class MoemlaRouter(nn.Module):
    def __init__(self, cfg: MoemlaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.dim))
        self.register_buffer("bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))  # balancing bias

    def forward(self, x):
        """x (N, C) -> gates (N, K) summing to 1, expert indices (N, K); in fp32."""
        logits = F.linear(x.float(), self.weight.float())
        k = self.cfg.n_activated_experts
        if self.cfg.bias_in_gate:  # the paper's Algorithm 1: TopK(softmax(l + b))
            gates, idx = torch.softmax(logits + self.bias.float(), dim=-1).topk(k, dim=-1)
        else:  # DeepSeek-V3: the bias picks experts, the gates use the unbiased scores
            scores = torch.softmax(logits, dim=-1)
            idx = (scores + self.bias.float()).topk(k, dim=-1).indices
            gates = scores.gather(-1, idx)
        return gates / gates.sum(dim=-1, keepdim=True), idx


class MoemlaExperts(nn.Module):
    def __init__(self, cfg: MoemlaConfig) -> None:
        super().__init__()
        e, c, hid = cfg.n_routed_experts, cfg.dim, cfg.expert_inter_dim
        self.w1 = nn.Parameter(torch.empty(e, c, hid))  # (E, C, h)
        self.w2 = nn.Parameter(torch.empty(e, hid, c))  # (E, h, C)

    def forward(self, x, gates, idx):
        out = torch.zeros_like(x)
        for e in idx.unique().tolist():  # only experts that received tokens
            token, slot = (idx == e).nonzero(as_tuple=True)
            y = F.gelu(x[token] @ self.w1[e]) @ self.w2[e]
            out.index_add_(0, token, y * gates[token, slot, None].to(y.dtype))
        return out


class MoemlaMoE(nn.Module):
    """Shared experts (always on, fused into one MLP) plus the top-k of the routed experts."""

    def __init__(self, cfg: MoemlaConfig) -> None:
        super().__init__()
        self.router = MoemlaRouter(cfg)
        self.experts = MoemlaExperts(cfg)
        hidden = cfg.n_shared_experts * cfg.expert_inter_dim
        self.shared = MoemlaMLP(cfg.dim, hidden, bias=False) if hidden else None

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, C)
        gates, idx = self.router(x)
        y = self.experts(x, gates, idx)
        if self.shared is not None:
            y = y + self.shared(x)
        return y.view(shape)


class MoemlaBlock(nn.Module):
    def __init__(self, cfg: MoemlaConfig, layer: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.attn = MoemlaMLA(cfg, layer) if cfg.attention == "mla" else MoemlaMHA(cfg, layer)
        self.ln2 = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        if cfg.ffn == "moe":
            self.ffn = MoemlaMoE(cfg)
        else:
            self.ffn = MoemlaMLP(cfg.dim, cfg.dense_inter_dim, cfg.bias)

    def forward(self, x, rope_q, rope_k, mask, cache):
        h = x + self.attn(self.ln1(x), rope_q, rope_k, mask, cache)
        return h + self.ffn(self.ln2(h))


class MoemlaPreTrainedModel(PreTrainedModel):
    config_class = MoemlaConfig
    base_model_prefix = "model"
    _no_split_modules = ["MoemlaBlock"]
    _supports_sdpa = True

    def post_init(self) -> None:
        super().post_init()
        if self.config.ffn == "moe":  # set per model: transformers 4.x refuses a name the model lacks (dense has none)
            # the routing bias moves by 1e-3 steps: bf16 would erase them
            self._keep_in_fp32_modules = self._keep_in_fp32_modules_strict = ["router"]

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, MoemlaRouter | MoemlaExperts):
            for p in module.parameters(recurse=False):
                nn.init.normal_(p, mean=0.0, std=0.02)


class MoemlaModel(MoemlaPreTrainedModel):
    def __init__(self, config: MoemlaConfig) -> None:
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.dim)
        self.wpe = nn.Embedding(config.max_seq_len, config.dim) if config.positions == "learned" else None
        self.blocks = nn.ModuleList(MoemlaBlock(config, i) for i in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.dim, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, value):
        self.wte = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, inputs_embeds=None):
        """Hidden states (B, T, C) after the final LayerNorm."""
        x = self.wte(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        b, t = x.shape[:2]
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if past + t > self.config.max_seq_len:
            raise ValueError(
                f"sequence of {past + t} tokens exceeds the model's context (max_seq_len={self.config.max_seq_len})"
            )
        key_ok = None
        if attention_mask is not None:
            if attention_mask.shape[-1] != past + t:
                raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} slots; expected {past + t}")
            key_ok = attention_mask.bool()
            key_pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, S): left padding shifts positions
            if bool(key_ok.all()):
                key_ok = None
        else:
            key_pos = torch.arange(past + t, device=x.device)[None].expand(b, -1)
        query_pos = key_pos[:, past:] if position_ids is None else position_ids
        if self.wpe is not None:
            x = x + self.wpe(query_pos)
        rope_q = rope_k = None
        if self.config.positions == "rope":
            rope_q = rope_angles(query_pos, self.config.rope_dim, self.config.rope_base)
            rope_k = rope_angles(key_pos, self.config.rope_dim, self.config.rope_base)
        mask = attention_mask_4d(key_ok, past, t, x.device)
        for block in self.blocks:
            x = block(x, rope_q, rope_k, mask, past_key_values)
        return self.ln_f(x)


class MoemlaForCausalLM(MoemlaPreTrainedModel, GenerationMixin):
    def __init__(self, config: MoemlaConfig) -> None:
        super().__init__(config)
        self.model = MoemlaModel(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.wte

    def set_input_embeddings(self, value):
        self.model.wte = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        cache=None,
        **kwargs,
    ):
        use_cache = self.config.use_cache if use_cache is None else use_cache
        past = cache if cache is not None else past_key_values  # whichever name this transformers passes
        if use_cache and past is None:
            past = DynamicCache()
        h = self.model(input_ids, attention_mask, position_ids, past if use_cache else None, inputs_embeds)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = F.linear(h, self.model.wte.weight)  # (B, T, V): input and output embeddings are one matrix
        loss = None
        if labels is not None:  # labels are the inputs; shift so token t predicts t + 1
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_NAME: past if use_cache else None})
