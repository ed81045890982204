"""DeepSeek-V3 and Llama as transformers know them: the DeepSeek flavor's models as native folders (no remote code).

With --flavor deepseek, moe-mla-drope and mla-drope are DeepSeek-V3's architecture (`model_type: deepseek_v3`:
q_lora_rank null, one routing group, first_k_dense_replace = all layers for a dense model) and mha-rope is Llama's.
The weights are written in the layout their own checkpoints use (one tensor per expert and projection), which
transformers, vLLM, SGLang and llama.cpp's converter all read. Two conversions are exact rearrangements:

- RoPE: moemla rotates channel pairs (i, i + P/2); DeepSeek's checkpoints pair (2i, 2i + 1) (`rope_interleave`),
  so the rows that make the decoupled RoPE query channels and the shared RoPE key are interleaved. Llama's
  transformers layout pairs (i, i + D/2) as moemla does: no change.
- the experts' w1 holds SwiGLU's [gate | up] side by side (moe.activate); they are written as gate_proj, up_proj.
"""

from __future__ import annotations

import torch

from moemla.config import NORM_EPS, ModelConfig

DEEPSEEK = "deepseek_v3"
LLAMA = "llama"


def native_blocker(cfg: ModelConfig) -> tuple[str | None, str]:
    """(the native architecture that computes exactly this model, or None; and, when None, the first switch that
    keeps it from DeepSeek-V3's or Llama's block and the value it needs)."""
    need = {"norm": "rmsnorm", "ffn_activation": "swiglu", "bias": False, "positions": "rope"}
    if cfg.attention == "mla":
        need |= {"rope_mode": "decoupled", "latent": "joint"}
    else:
        need |= {"ffn": "dense"}
    if cfg.ffn == "moe":
        need |= {"scoring": "sigmoid", "bias_in_gate": False, "routing": "top-k"}
    for field, value in need.items():
        if getattr(cfg, field) != value:
            return None, f"--{field.replace('_', '-')} {getattr(cfg, field)}: needs {value}"
    if cfg.ffn == "moe" and (cfg.n_shared_experts < 1 or cfg.n_routed_experts < 2):
        return None, "DeepSeek-V3 needs at least one shared and two routed experts"
    return (DEEPSEEK if cfg.attention == "mla" else LLAMA), ""


def _base(cfg: ModelConfig, eot: int) -> dict[str, object]:
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_heads,
        "intermediate_size": cfg.dense_inter_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": NORM_EPS,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base},
        "rope_theta": cfg.rope_base,  # transformers 4.x reads this one
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "pad_token_id": eot,
    }


def deepseek_config(cfg: ModelConfig, eot: int) -> dict[str, object]:
    moe = cfg.ffn == "moe"
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": DEEPSEEK,
        **_base(cfg, eot),
        "q_lora_rank": None,
        "kv_lora_rank": cfg.kv_lora_rank,
        "qk_nope_head_dim": cfg.head_dim,
        "qk_rope_head_dim": cfg.rope_dim,
        "v_head_dim": cfg.head_dim,
        "head_dim": cfg.rope_dim,  # transformers' rotary width
        "rope_interleave": True,  # the checkpoint's RoPE rows are interleaved (module docstring)
        "n_routed_experts": cfg.n_routed_experts,
        "n_shared_experts": cfg.n_shared_experts,
        "num_experts_per_tok": cfg.n_activated_experts,
        "moe_intermediate_size": cfg.expert_inter_dim,
        "first_k_dense_replace": 0 if moe else cfg.n_layers,  # a dense model: every layer keeps its MLP
        "n_group": 1,
        "topk_group": 1,
        "norm_topk_prob": True,  # the gates: the chosen sigmoid scores over their sum, as moemla's router
        "routed_scaling_factor": 1.0,
        # vLLM creates the correction bias only for noaux_tc and reads scoring_func (transformers ignores both)
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "num_nextn_predict_layers": 0,
    }


def llama_config(cfg: ModelConfig, eot: int) -> dict[str, object]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": LLAMA,
        **_base(cfg, eot),
        "head_dim": cfg.head_dim,
        "mlp_bias": False,
    }


def interleave(p: int) -> torch.Tensor:
    """Row order (P,) that takes moemla's RoPE layout, pairs (i, i + P/2), to DeepSeek's, pairs (2i, 2i + 1)."""
    half = torch.arange(p // 2)
    return torch.stack([half, half + p // 2], dim=1).flatten()


def rope_rows(w: torch.Tensor, heads: int, nope: int, rope: int, order: torch.Tensor) -> torch.Tensor:
    """w's rows per head [nope | rope] with each head's rope rows in `order`."""
    blocks = w.view(heads, nope + rope, *w.shape[1:])
    return torch.cat([blocks[:, :nope], blocks[:, nope:][:, order]], dim=1).reshape(w.shape)


def _swiglu(w1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An MLP's w1 weight (2h, C) as SwiGLU's (gate (h, C), up (h, C))."""
    gate, up = w1.chunk(2, dim=0)
    return gate, up


def deepseek_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """moemla's DeepSeek-flavored MLA weights under DeepSeek-V3's checkpoint names."""
    sd, cfg = model.state_dict(), model.cfg
    h, d, p, r = cfg.n_heads, cfg.head_dim, cfg.rope_dim, cfg.kv_lora_rank
    order = interleave(p)
    out = _shared_names(sd, cfg)
    for i in range(cfg.n_layers):
        ours, theirs = f"blocks.{i}", f"model.layers.{i}"
        out[f"{theirs}.self_attn.q_proj.weight"] = rope_rows(sd[f"{ours}.attn.wq.weight"], h, d, p, order)
        kv_a = sd[f"{ours}.attn.wkv_a.weight"]  # rows [latent (r) | RoPE key (P)]
        out[f"{theirs}.self_attn.kv_a_proj_with_mqa.weight"] = torch.cat([kv_a[:r], kv_a[r:][order]])
        out[f"{theirs}.self_attn.kv_a_layernorm.weight"] = sd[f"{ours}.attn.kv_norm.weight"]
        w_k, w_v = sd[f"{ours}.attn.wk_b.weight"].view(h, d, r), sd[f"{ours}.attn.wv_b.weight"].view(h, d, r)
        out[f"{theirs}.self_attn.kv_b_proj.weight"] = torch.cat([w_k, w_v], dim=1).reshape(2 * h * d, r)  # per head
        out[f"{theirs}.self_attn.o_proj.weight"] = sd[f"{ours}.attn.wo.weight"]
        out |= _ffn(sd, cfg, ours, theirs)
    return out


def llama_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """moemla's DeepSeek-flavored mha-rope weights under Llama's names (q, k, v: the rows of wqkv in thirds)."""
    sd, cfg = model.state_dict(), model.cfg
    out = _shared_names(sd, cfg)
    for i in range(cfg.n_layers):
        ours, theirs = f"blocks.{i}", f"model.layers.{i}"
        q, k, v = sd[f"{ours}.attn.wqkv.weight"].chunk(3, dim=0)
        att = f"{theirs}.self_attn"
        out |= {f"{att}.q_proj.weight": q, f"{att}.k_proj.weight": k, f"{att}.v_proj.weight": v,
                f"{att}.o_proj.weight": sd[f"{ours}.attn.wo.weight"]}  # fmt: skip
        out |= _ffn(sd, cfg, ours, theirs)
    return out


def _shared_names(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Embedding, final norm, the head (written out though tied: vLLM reads lm_head.weight), per-layer norms."""
    out = {"model.embed_tokens.weight": sd["wte.weight"], "lm_head.weight": sd["wte.weight"].clone(),
           "model.norm.weight": sd["ln_f.weight"]}  # fmt: skip
    for i in range(cfg.n_layers):
        out[f"model.layers.{i}.input_layernorm.weight"] = sd[f"blocks.{i}.ln1.weight"]
        out[f"model.layers.{i}.post_attention_layernorm.weight"] = sd[f"blocks.{i}.ln2.weight"]
    return out


def _ffn(sd: dict[str, torch.Tensor], cfg: ModelConfig, ours: str, theirs: str) -> dict[str, torch.Tensor]:
    """The dense MLP, or the router, routed experts (one tensor each) and the fused shared experts."""
    out = {}
    if cfg.ffn == "dense":
        gate, up = _swiglu(sd[f"{ours}.ffn.w1.weight"])
        return {f"{theirs}.mlp.gate_proj.weight": gate, f"{theirs}.mlp.up_proj.weight": up,
                f"{theirs}.mlp.down_proj.weight": sd[f"{ours}.ffn.w2.weight"]}  # fmt: skip
    out[f"{theirs}.mlp.gate.weight"] = sd[f"{ours}.ffn.router.weight"]
    out[f"{theirs}.mlp.gate.e_score_correction_bias"] = sd[f"{ours}.ffn.router.bias"]
    w1, w2 = sd[f"{ours}.ffn.experts.w1"], sd[f"{ours}.ffn.experts.w2"]  # (E, C, 2h), (E, h, C)
    for j in range(cfg.n_routed_experts):
        gate, up = _swiglu(w1[j].T)
        pre = f"{theirs}.mlp.experts.{j}"
        out |= {f"{pre}.gate_proj.weight": gate, f"{pre}.up_proj.weight": up, f"{pre}.down_proj.weight": w2[j].T}
    gate, up = _swiglu(sd[f"{ours}.ffn.shared.w1.weight"])
    pre = f"{theirs}.mlp.shared_experts"
    out |= {f"{pre}.gate_proj.weight": gate, f"{pre}.up_proj.weight": up,
            f"{pre}.down_proj.weight": sd[f"{ours}.ffn.shared.w2.weight"]}  # fmt: skip
    return out


def from_native(weights: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The inverse of deepseek_weights / llama_weights: moemla's state dict from a native folder's tensors.
    KeyError names a tensor the folder lacks."""
    out = {"wte.weight": weights["model.embed_tokens.weight"], "ln_f.weight": weights["model.norm.weight"]}
    h, d = cfg.n_heads, cfg.head_dim
    for i in range(cfg.n_layers):
        ours, theirs = f"blocks.{i}", f"model.layers.{i}"
        out[f"{ours}.ln1.weight"] = weights[f"{theirs}.input_layernorm.weight"]
        out[f"{ours}.ln2.weight"] = weights[f"{theirs}.post_attention_layernorm.weight"]
        att = f"{theirs}.self_attn"
        out[f"{ours}.attn.wo.weight"] = weights[f"{att}.o_proj.weight"]
        if cfg.attention == "mha":
            qkv = [weights[f"{att}.{x}_proj.weight"] for x in "qkv"]
            out[f"{ours}.attn.wqkv.weight"] = torch.cat(qkv)
        else:
            p, r = cfg.rope_dim, cfg.kv_lora_rank
            back = torch.argsort(interleave(p))
            out[f"{ours}.attn.wq.weight"] = rope_rows(weights[f"{att}.q_proj.weight"], h, d, p, back)
            kv_a = weights[f"{att}.kv_a_proj_with_mqa.weight"]
            out[f"{ours}.attn.wkv_a.weight"] = torch.cat([kv_a[:r], kv_a[r:][back]])
            out[f"{ours}.attn.kv_norm.weight"] = weights[f"{att}.kv_a_layernorm.weight"]
            w_k, w_v = weights[f"{att}.kv_b_proj.weight"].view(h, 2 * d, r).split(d, dim=1)
            out[f"{ours}.attn.wk_b.weight"] = w_k.reshape(h * d, r)
            out[f"{ours}.attn.wv_b.weight"] = w_v.reshape(h * d, r)
        mlp = f"{theirs}.mlp"
        if cfg.ffn == "dense":
            gate_up = [weights[f"{mlp}.gate_proj.weight"], weights[f"{mlp}.up_proj.weight"]]
            out[f"{ours}.ffn.w1.weight"] = torch.cat(gate_up)
            out[f"{ours}.ffn.w2.weight"] = weights[f"{mlp}.down_proj.weight"]
            continue
        out[f"{ours}.ffn.router.weight"] = weights[f"{mlp}.gate.weight"]
        out[f"{ours}.ffn.router.bias"] = weights[f"{mlp}.gate.e_score_correction_bias"]
        experts = range(cfg.n_routed_experts)
        out[f"{ours}.ffn.experts.w1"] = torch.stack([torch.cat([weights[f"{mlp}.experts.{j}.gate_proj.weight"],
                                                               weights[f"{mlp}.experts.{j}.up_proj.weight"]]).T
                                                    for j in experts])  # fmt: skip
        out[f"{ours}.ffn.experts.w2"] = torch.stack([weights[f"{mlp}.experts.{j}.down_proj.weight"].T for j in experts])
        shared = f"{mlp}.shared_experts"
        out[f"{ours}.ffn.shared.w1.weight"] = torch.cat([weights[f"{shared}.gate_proj.weight"],
                                                         weights[f"{shared}.up_proj.weight"]])  # fmt: skip
        out[f"{ours}.ffn.shared.w2.weight"] = weights[f"{shared}.down_proj.weight"]
    return out
