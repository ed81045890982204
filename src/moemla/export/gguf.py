"""`moemla export RUN OUT --format gguf`: a DeepSeek-flavored run as one GGUF file for llama.cpp (and Ollama).

moe-mla-drope and mla-drope in the DeepSeek flavor are llama.cpp's `deepseek2` architecture; mha-rope is `llama`.
llama.cpp runs `deepseek2` as multi-query attention over the latent: one "KV head" whose key is the joint latent
plus the shared RoPE key (r + P) and whose value is the latent (r), with W^Kr absorbed into the query
(`attn_k_b`, per head (r, D)) and W^Vr applied after the attention (`attn_v_b`, per head (D, r)). So its cache holds
what moemla's does, the latent and the RoPE key, and nothing else. The RoPE rows are DeepSeek's interleaved layout
(the same rearrangement as the native Hugging Face export, hf_native.interleave), which llama.cpp rotates in pairs
(2i, 2i + 1); for `llama` it rotates whole heads that way, so each head's q and k rows are interleaved too.
Written with the `gguf` package; q8_0 and q4_0 quantized by its own quantizers. The folder also holds moemla's
tokenizer.json, so that `moemla generate/eval/bench` run the file through llama.cpp (inference/llamacpp).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from moemla.config import GGUF_TYPES, NORM_EPS, GGUFType, ModelConfig
from moemla.data.sources import EOT
from moemla.export.hf_native import DEEPSEEK, deepseek_weights, interleave, llama_weights, native_blocker, rope_rows
from moemla.folders import GGUF_FILE, MODELFILE

GGUF_VERSION = 2  # 2: tokenizer.json beside model.gguf
Q_BLOCK = 32  # weights per q8_0 / q4_0 block (one fp16 scale each)
EXTRA = "pip install 'moemla[gguf]' (gguf, and xllamacpp to run the file)"


def gguf_architecture(cfg: ModelConfig) -> str:
    """llama.cpp's name for this model's architecture; ValueError naming the switch that blocks it."""
    native, why = native_blocker(cfg)
    if native is None:
        raise ValueError(f"llama.cpp runs DeepSeek-V3's and Llama's blocks only ({why}); train with --flavor deepseek "
                         "and --variant moe-mla-drope, mla-drope or mha-rope")  # fmt: skip
    return "deepseek2" if native == DEEPSEEK else "llama"


def _hyperparameters(w: object, cfg: ModelConfig, arch: str) -> None:
    import gguf

    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.dense_inter_dim)
    w.add_head_count(cfg.n_heads)
    w.add_rope_freq_base(cfg.rope_base)
    w.add_layer_norm_rms_eps(NORM_EPS)
    w.add_vocab_size(cfg.vocab_size)
    if arch == "llama":
        w.add_head_count_kv(cfg.n_heads)
        w.add_rope_dimension_count(cfg.head_dim)
        return
    r, p, d = cfg.kv_lora_rank, cfg.rope_dim, cfg.head_dim
    w.add_head_count_kv(1)  # MLA as multi-query attention over the latent (module docstring)
    w.add_q_lora_rank(0)  # the query is one projection (no low-rank query, q_lora_rank null)
    w.add_kv_lora_rank(r)
    w.add_key_length(r + p)  # what the cache holds per token: the latent and the RoPE key ...
    w.add_value_length(r)  # ... whose latent part is also the value
    w.add_key_length_mla(d + p)  # the expanded heads' widths
    w.add_value_length_mla(d)
    w.add_rope_dimension_count(p)
    moe = cfg.ffn == "moe"
    # a dense model is every layer "leading dense"; llama.cpp reads the expert keys all the same
    w.add_leading_dense_block_count(0 if moe else cfg.n_layers)
    w.add_expert_count(cfg.n_routed_experts if moe else 0)
    w.add_expert_used_count(cfg.n_activated_experts if moe else 0)
    w.add_expert_shared_count(cfg.n_shared_experts if moe else 0)
    w.add_expert_feed_forward_length(cfg.expert_inter_dim if moe else 0)
    w.add_expert_weights_scale(1.0)
    w.add_expert_weights_norm(True)  # the chosen sigmoid scores over their sum, as moemla's router
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)


def _tokenizer(w: object, tok: Tokenizer) -> None:
    """The byte-level BPE inside the file: tokens by id, their types, the merges, GPT-2's pre-tokenizer."""
    import gguf

    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    special = {t["content"] for t in data["added_tokens"] if t.get("special")}
    types = [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")  # our pre-tokenizer is GPT-2's byte-level regex (data/tokenizer.train_bpe)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    eot = tok.token_to_id(EOT)
    w.add_bos_token_id(eot)
    w.add_eos_token_id(eot)
    w.add_add_bos_token(False)


# Hugging Face checkpoint names (hf_native) -> llama.cpp's, per layer
GGUF_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "attn_kv_a_mqa.weight",
    "self_attn.kv_a_layernorm.weight": "attn_kv_a_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.gate.e_score_correction_bias": "exp_probs_b.bias",
    "mlp.shared_experts.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_experts.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_experts.down_proj.weight": "ffn_down_shexp.weight",
}


def gguf_tensors(model: torch.nn.Module, arch: str) -> dict[str, torch.Tensor]:
    """The model's tensors under llama.cpp's names, in the layouts it reads (numpy order: GGUF reverses them)."""
    cfg = model.cfg
    hf = deepseek_weights(model) if arch == "deepseek2" else llama_weights(model)
    out = {"token_embd.weight": hf.pop("model.embed_tokens.weight"), "output.weight": hf.pop("lm_head.weight"),
           "output_norm.weight": hf.pop("model.norm.weight")}  # fmt: skip
    h, d, r = cfg.n_heads, cfg.head_dim, cfg.kv_lora_rank
    for i in range(cfg.n_layers):
        pre = f"model.layers.{i}."
        if arch == "deepseek2":  # the up-projection split for the absorbed path: k_b per head (r, D), v_b (D, r)
            k_b, v_b = hf.pop(f"{pre}self_attn.kv_b_proj.weight").view(h, 2 * d, r).split(d, dim=1)
            out[f"blk.{i}.attn_k_b.weight"] = k_b.transpose(1, 2).contiguous()
            out[f"blk.{i}.attn_v_b.weight"] = v_b.contiguous()
        if arch == "llama":  # llama.cpp rotates Llama's pairs (2i, 2i + 1) too: interleave each head's q, k rows
            for x in "qk":
                w = hf.pop(f"{pre}self_attn.{x}_proj.weight")
                out[f"blk.{i}.attn_{x}.weight"] = rope_rows(w, h, 0, d, interleave(d))
        if cfg.ffn == "moe":
            for ours, theirs in (("gate_proj", "ffn_gate_exps"), ("up_proj", "ffn_up_exps"),
                                 ("down_proj", "ffn_down_exps")):  # fmt: skip
                experts = [hf.pop(f"{pre}mlp.experts.{j}.{ours}.weight") for j in range(cfg.n_routed_experts)]
                out[f"blk.{i}.{theirs}.weight"] = torch.stack(experts)  # (E, out, in)
        for name in [k for k in hf if k.startswith(pre)]:
            out[f"blk.{i}.{GGUF_NAMES[name.removeprefix(pre)]}"] = hf.pop(name)
    assert not hf, f"tensors left unmapped: {sorted(hf)[:3]}"
    return out


def write_gguf(model: torch.nn.Module, tok: Tokenizer, path: Path, qtype: GGUFType = "f32") -> dict[str, object]:
    """The GGUF file at `path`; returns what was written (architecture, type, size)."""
    try:
        import gguf
    except ImportError:
        raise ValueError(f"the GGUF export needs the gguf package: {EXTRA}") from None
    arch = gguf_architecture(model.cfg)
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[qtype]  # fmt: skip
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("moemla")
    w.add_file_type(ftype)
    _hyperparameters(w, model.cfg, arch)
    _tokenizer(w, tok)
    for name, t in gguf_tensors(model, arch).items():
        data = t.detach().float().cpu().numpy()
        # vectors (norms, the routing bias) and the router stay f32, as llama.cpp's own converter keeps them
        keep = data.ndim == 1 or name.endswith(("ffn_gate_inp.weight", "exp_probs_b.bias"))
        if qtype == "f32" or keep:
            w.add_tensor(name, data)
        elif qtype == "f16" or data.shape[-1] % Q_BLOCK:  # quants block rows of 32: a narrower row stays f16
            w.add_tensor(name, data.astype(np.float16))
        else:
            kind = gguf.GGMLQuantizationType.Q8_0 if qtype == "q8_0" else gguf.GGMLQuantizationType.Q4_0
            w.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"architecture": arch, "type": qtype, "bytes": path.stat().st_size}


def export_gguf(
    run_dir: str | Path, out_dir: str | Path, *, qtype: GGUFType = "f16", checkpoint: str | None = None,
    overwrite: bool = False,
) -> dict[str, object]:  # fmt: skip
    """A folder holding the run as model.gguf (llama.cpp, Ollama), an Ollama Modelfile and a manifest; assembled
    beside out_dir and moved into place whole. Returns the manifest."""

    from moemla.folders import assembled, check_destination
    from moemla.runs import RunFolder

    run = RunFolder.open(run_dir)
    gguf_architecture(run.model_config)  # refused before loading weights or touching OUT
    if qtype not in GGUF_TYPES:
        raise ValueError(f"--quantize for --format gguf is {', '.join(GGUF_TYPES)} (llama.cpp's names), not {qtype!r}")
    out = check_destination(out_dir, "export", sources=(run_dir,), overwrite=overwrite)
    model, tok = run.load_model("cpu", checkpoint, finite=True), run.tokenizer()
    ckpt = run.checkpoint(checkpoint)
    source = {"run": str(run.path.resolve()), "checkpoint": ckpt.name if ckpt else None}
    with assembled(out, "export") as folder:
        folder.mkdir()
        manifest = write_gguf_folder(model, tok, folder, qtype, source)
    return manifest


def write_gguf_folder(
    model: torch.nn.Module, tok: Tokenizer, folder: Path, qtype: GGUFType, source: dict | None = None
) -> dict[str, object]:
    """model.gguf, the Modelfile, tokenizer.json and the manifest in `folder` (export_gguf, and bench's random
    weights); returns the manifest."""
    from moemla import accounting
    from moemla.folders import GGUF_FORMAT, MANIFEST, TOKENIZER_FILE, file_sizes, write_text_atomic

    written = write_gguf(model, tok, folder / GGUF_FILE, qtype)
    (folder / MODELFILE).write_text(modelfile())
    tok.save(str(folder / TOKENIZER_FILE))  # moemla's own decode loop reads it (inference/llamacpp)
    cfg = model.cfg
    manifest = {
        "format": GGUF_FORMAT, "version": GGUF_VERSION, "architecture": written["architecture"], "type": qtype,
        "config": cfg.to_dict(),
        # llama.cpp caches the latent and the RoPE key (f16 by default: half the fp32 bytes)
        "kv_cache_bytes_per_token": {"f32": accounting.kv_cache_bytes_per_token(cfg, "float32"),
                                     "f16": accounting.kv_cache_bytes_per_token(cfg, "float16")},
        "files": file_sizes(folder), "bytes": written["bytes"], "source": source or {},
    }  # fmt: skip
    write_text_atomic(folder / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


def modelfile() -> str:
    """An Ollama Modelfile for the folder: the file, moemla's sampling defaults, <|endoftext|> as the stop."""
    from moemla.inference.sampling import SamplingConfig

    s = SamplingConfig()
    lines = [f"FROM ./{GGUF_FILE}", f"PARAMETER temperature {s.temperature}", f"PARAMETER top_k {s.top_k}",
             f'PARAMETER stop "{EOT}"']  # fmt: skip
    return "\n".join(lines) + "\n"
