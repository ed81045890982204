"""Hugging Face config of a moemla model (MoE-MLA-RoPE family, arXiv 2508.01261); needs only transformers."""

from __future__ import annotations

from transformers import PretrainedConfig


class MoemlaConfig(PretrainedConfig):
    """Every size and variant field of moemla's ModelConfig, with derived sizes written out explicitly."""

    model_type = "moemla"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {
        "hidden_size": "dim",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "max_position_embeddings": "max_seq_len",
    }

    def __init__(
        self,
        vocab_size: int = 50257,
        max_seq_len: int = 512,
        n_layers: int = 6,
        dim: int = 256,
        n_heads: int = 8,
        bias: bool = True,
        attention: str = "mla",  # mha | mla
        positions: str = "rope",  # learned | rope
        ffn: str = "moe",  # dense | moe
        kv_lora_rank: int = 128,  # MLA latent rank r
        rope_mode: str = "post",  # post: RoPE after the up-projection (the paper); decoupled: DeepSeek-V2
        rope_dim: int = 32,  # channels RoPE rotates per head
        rope_base: float = 10000.0,
        dense_inter_dim: int = 1024,
        n_routed_experts: int = 62,
        n_shared_experts: int = 2,
        n_activated_experts: int = 6,
        expert_inter_dim: int = 256,
        bias_in_gate: bool = True,  # gates from softmax(l + b) (the paper) or from the unbiased scores
        layer_norm_eps: float = 1e-5,
        moemla_variant: str | None = None,
        use_cache: bool = True,
        **kwargs,
    ) -> None:
        self.vocab_size, self.max_seq_len, self.n_layers = vocab_size, max_seq_len, n_layers
        self.dim, self.n_heads, self.bias = dim, n_heads, bias
        self.attention, self.positions, self.ffn = attention, positions, ffn
        self.kv_lora_rank, self.rope_mode, self.rope_dim, self.rope_base = kv_lora_rank, rope_mode, rope_dim, rope_base
        self.dense_inter_dim = dense_inter_dim
        self.n_routed_experts, self.n_shared_experts = n_routed_experts, n_shared_experts
        self.n_activated_experts, self.expert_inter_dim = n_activated_experts, expert_inter_dim
        self.bias_in_gate, self.layer_norm_eps = bias_in_gate, layer_norm_eps
        self.moemla_variant, self.use_cache = moemla_variant, use_cache
        kwargs.setdefault("tie_word_embeddings", False)  # logits read the embedding directly: no lm_head to tie
        super().__init__(**kwargs)
