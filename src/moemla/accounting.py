"""Closed-form parameter, FLOP and KV-cache accounting for any ModelConfig (pure functions)."""

from __future__ import annotations

from moemla.config import ModelConfig, flavor_name, variant_name
from moemla.model.kv_cache import cache_numel_per_token


def attention_weights(cfg: ModelConfig) -> int:
    """The attention's matrix entries. MHA: W^Q, W^K, W^V, W^O (d x d). MLA: W^Q (d x d, plus H * P decoupled RoPE
    channels), W^Kc and W^Vc (d x r each, Eq. 13) or one joint W^KVc (d x r), the shared RoPE key (d x P), W^Kr and
    W^Vr (r x d for all heads, Eq. 14), W^O."""
    d, r = cfg.dim, cfg.kv_lora_rank
    if cfg.attention == "mha":
        return 4 * d * d
    p = cfg.rope_dim if cfg.decoupled else 0
    latent = (1 if cfg.latent == "joint" else 2) * r
    return d * (d + cfg.n_heads * p) + d * (latent + p) + 2 * r * d + d * d


def attention_params(cfg: ModelConfig) -> int:
    """attention_weights plus each projection's bias (where cfg.bias) and the joint latent's RMSNorm weight."""
    d, r = cfg.dim, cfg.kv_lora_rank
    if cfg.attention == "mha":
        return attention_weights(cfg) + 4 * d * cfg.bias
    p = cfg.rope_dim if cfg.decoupled else 0
    latent = (1 if cfg.latent == "joint" else 2) * r
    biases = (d + cfg.n_heads * p) + (latent + p) + 3 * d
    return attention_weights(cfg) + biases * cfg.bias + (r if cfg.latent == "joint" else 0)


def ffn_matrices(cfg: ModelConfig) -> int:
    """Matrices per FFN: GELU's w1, w2; SwiGLU's gate, up, down."""
    return 3 if cfg.ffn_activation == "swiglu" else 2


def expert_params(cfg: ModelConfig) -> int:
    """One routed or shared expert: an MLP d -> h -> d (GELU, or SwiGLU's three matrices) without biases."""
    return ffn_matrices(cfg) * cfg.dim * cfg.expert_inter_dim


def ffn_params(cfg: ModelConfig) -> int:
    d = cfg.dim
    if cfg.ffn == "moe":
        router = cfg.n_routed_experts * d  # W_g; the balancing bias b is a buffer, not a parameter
        return router + (cfg.n_routed_experts + cfg.n_shared_experts) * expert_params(cfg)
    f = cfg.dense_inter_dim
    return ffn_matrices(cfg) * d * f + ((ffn_matrices(cfg) - 1) * f + d) * cfg.bias


def norm_params(cfg: ModelConfig) -> int:
    """One normalisation: LayerNorm's weight and bias, or RMSNorm's weight."""
    return (2 if cfg.norm == "layernorm" else 1) * cfg.dim


def block_params(cfg: ModelConfig) -> int:
    return 2 * norm_params(cfg) + attention_params(cfg) + ffn_params(cfg)


def total_params(cfg: ModelConfig) -> int:
    d = cfg.dim
    embeddings = cfg.vocab_size * d + (cfg.max_seq_len * d if cfg.positions == "learned" else 0)
    return embeddings + cfg.n_layers * block_params(cfg) + norm_params(cfg)  # LM head tied to the embedding


def active_params(cfg: ModelConfig) -> int:
    """Parameters used for one token: all but the routed experts the router did not pick."""
    if cfg.ffn != "moe":
        return total_params(cfg)
    idle = (cfg.n_routed_experts - cfg.n_activated_experts) * expert_params(cfg)
    return total_params(cfg) - cfg.n_layers * idle


def ffn_matmul_weights_per_token(cfg: ModelConfig) -> int:
    """Feed-forward weights one token multiplies by in one layer: router + (k + N_s) experts, or the MLP."""
    if cfg.ffn == "moe":
        active = cfg.n_activated_experts + cfg.n_shared_experts
        return cfg.n_routed_experts * cfg.dim + active * expert_params(cfg)
    return ffn_matrices(cfg) * cfg.dim * cfg.dense_inter_dim


def matmul_weights_per_token(cfg: ModelConfig) -> int:
    """Weights one token multiplies by in a forward pass (biases, norms and lookups excluded)."""
    attn = attention_weights(cfg)
    return cfg.n_layers * (attn + ffn_matmul_weights_per_token(cfg)) + cfg.vocab_size * cfg.dim  # + LM head


def flops_per_token(cfg: ModelConfig, context: int | None = None) -> int:
    """Forward FLOPs for one token attending to `context` positions (default: the full max_seq_len).

    2 FLOPs per multiply-add; attention adds QK^T and AV, 2 * d * context each, per layer.
    MLA's naive path expands its latents to full heads, so its attention costs the same as MHA's.
    For the average over a causal training sequence of length T use context = (T + 1) / 2.
    """
    context = cfg.max_seq_len if context is None else context
    attention = 4 * cfg.dim * context
    if cfg.decoupled:  # the scores also dot the RoPE channels
        attention += 2 * cfg.n_heads * cfg.rope_dim * context
    combine = 2 * cfg.n_activated_experts * cfg.dim if cfg.ffn == "moe" else 0  # Eq. 2's gate-weighted sum
    return 2 * matmul_weights_per_token(cfg) + cfg.n_layers * (attention + combine)


def flops_per_token_at(cfg: ModelConfig, active_experts: float, context: int | None = None) -> float:
    """flops_per_token with `active_experts` routed experts per token, a mean measured under top-p routing
    (whose config names only the most a token may get)."""
    one = cfg.replace(routing="top-k", n_activated_experts=1, min_activated_experts=1)
    f1, f2 = flops_per_token(one, context), flops_per_token(one.replace(n_activated_experts=2), context)
    return f1 + (active_experts - 1) * (f2 - f1)


# the one table of element types moemla names: their bytes (device.DTYPES maps the float ones to torch's), and the
# short names `moemla info --dtype` also takes
FLOAT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
DTYPE_BYTES = {**FLOAT_BYTES, "int8": 1, **{alias: FLOAT_BYTES[name] for alias, name in DTYPE_ALIASES.items()}}


def kv_cache_bytes_per_token(cfg: ModelConfig, dtype: str = "float32") -> int:
    """Bytes the KV cache holds per token of one sequence, all layers: MHA 2dL, MLA 2rL elements."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPE_BYTES)}")
    return cache_numel_per_token(cfg) * DTYPE_BYTES[dtype]


def summary(cfg: ModelConfig, context: int | None = None, dtype: str = "float32") -> dict[str, object]:
    """Everything `moemla info` reports, as one flat dict."""
    return {
        "variant": variant_name(cfg),
        "attention": cfg.attention,
        "positions": cfg.positions,
        "ffn": cfg.ffn,
        "n_layers": cfg.n_layers,
        "dim": cfg.dim,
        "n_heads": cfg.n_heads,
        "vocab_size": cfg.vocab_size,
        "kv_lora_rank": cfg.kv_lora_rank if cfg.attention == "mla" else None,
        "rope_mode": cfg.rope_mode if cfg.attention == "mla" and cfg.positions == "rope" else None,
        "flavor": flavor_name(cfg) or "custom",
        "norm": cfg.norm,
        "ffn_activation": cfg.ffn_activation,
        "latent": cfg.latent if cfg.attention == "mla" else None,
        "scoring": cfg.scoring if cfg.ffn == "moe" else None,
        "total_params": total_params(cfg),
        "active_params": active_params(cfg),
        "flops_per_token": flops_per_token(cfg, context),
        "flops_context": cfg.max_seq_len if context is None else context,
        "kv_cache_bytes_per_token": kv_cache_bytes_per_token(cfg, dtype),
        "kv_cache_dtype": dtype,
    }
