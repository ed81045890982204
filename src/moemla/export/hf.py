"""`moemla export --format hf`: a run's checkpoint as a Hugging Face model folder.

Dense baselines go to a native architecture where one maps exactly (mha -> GPT-2 with exact GELU; mha-rope ->
GPT-NeoX with full rotary and sequential residual: both proved by logit tests). Every variant can go out as
remote code: `modeling_moemla.py` + `configuration_moemla.py`, which need only torch and transformers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Literal

import torch
from tokenizers import Tokenizer

from moemla.config import ConfigError, ModelConfig, check_portable, variant_name
from moemla.data.sources import EOT
from moemla.device import DTYPES
from moemla.export.hf_native import (
    DEEPSEEK,
    LLAMA,
    deepseek_config,
    deepseek_weights,
    llama_config,
    llama_weights,
    native_blocker,
)
from moemla.folders import HF_CONFIG, assembled, check_destination, write_text_atomic
from moemla.inference.sampling import SamplingConfig
from moemla.model import Transformer
from moemla.runs import RunFolder
from moemla.runs.checkpoint import save_safetensors
from moemla.runs.folder import TOKENIZER_FILE

Architecture = Literal["auto", "native", "remote"]
REMOTE = Path(__file__).parent / "remote"
REMOTE_FILES = ("configuration_moemla.py", "modeling_moemla.py")
MOEMLA_TOKENIZER = "moemla_tokenizer.json"


# per-block module names: ours -> transformers' (GPT-2's Conv1D matrices are stored transposed)
GPT2_NAMES = {"ln1": "ln_1", "ln2": "ln_2", "attn.wqkv": "attn.c_attn", "attn.wo": "attn.c_proj",
              "ffn.w1": "mlp.c_fc", "ffn.w2": "mlp.c_proj"}  # fmt: skip
NEOX_NAMES = {"ln1": "input_layernorm", "ln2": "post_attention_layernorm", "attn.wo": "attention.dense",
              "ffn.w1": "mlp.dense_h_to_4h", "ffn.w2": "mlp.dense_4h_to_h"}  # fmt: skip


class ExportError(ValueError):
    """An export that cannot be done as asked; the message says what to change."""


def native_architecture(cfg: ModelConfig) -> str | None:
    """The transformers architecture that computes exactly this model, or None (then remote code): the paper's
    dense MHA as GPT-2 or GPT-NeoX, the DeepSeek flavor as DeepSeek-V3 or Llama (hf_native)."""
    paper = cfg.norm == "layernorm" and cfg.ffn_activation == "gelu"
    dense_mha = cfg.attention == "mha" and cfg.ffn == "dense" and cfg.bias and paper
    if dense_mha and cfg.positions == "learned":
        return "gpt2"
    if dense_mha and cfg.positions == "rope":
        return "gpt_neox"
    return native_blocker(cfg)[0]


def deepseek_v3_config(cfg: ModelConfig, eot: int, dtype: str) -> dict[str, object]:
    return {**deepseek_config(cfg, eot), **_common(cfg, eot, dtype)}


def llama_hf_config(cfg: ModelConfig, eot: int, dtype: str) -> dict[str, object]:
    return {**llama_config(cfg, eot), **_common(cfg, eot, dtype)}


def _common(cfg: ModelConfig, eot: int, dtype: str) -> dict[str, object]:
    """Fields every exported config.json carries: special tokens, dtype, and moemla's own config."""
    return {
        "bos_token_id": eot,
        "eos_token_id": eot,
        "pad_token_id": eot,
        "dtype": dtype,  # transformers 5 reads dtype, 4.x torch_dtype
        "torch_dtype": dtype,
        "moemla_variant": variant_name(cfg),
        "moemla_config": cfg.to_dict(),  # the exact ModelConfig: provenance, and the way back into moemla
    }


def remote_config(cfg: ModelConfig, eot: int, dtype: str) -> dict[str, object]:
    fields = {
        k: getattr(cfg, k)
        for k in ("vocab_size", "max_seq_len", "n_layers", "dim", "n_heads", "bias", "attention", "positions", "ffn")
    }
    fields |= {
        "kv_lora_rank": cfg.kv_lora_rank,
        "rope_mode": cfg.rope_mode,
        "rope_dim": cfg.rope_dim,
        "rope_base": cfg.rope_base,
        "dense_inter_dim": cfg.dense_inter_dim,
        "n_routed_experts": cfg.n_routed_experts,
        "n_shared_experts": cfg.n_shared_experts,
        "n_activated_experts": cfg.n_activated_experts,
        "expert_inter_dim": cfg.expert_inter_dim,
        "bias_in_gate": cfg.bias_in_gate,
    }
    return {
        "architectures": ["MoemlaForCausalLM"],
        "model_type": "moemla",
        "auto_map": {
            "AutoConfig": "configuration_moemla.MoemlaConfig",
            "AutoModelForCausalLM": "modeling_moemla.MoemlaForCausalLM",
        },
        **fields,
        "tie_word_embeddings": False,
        "use_cache": True,
        **_common(cfg, eot, dtype),
    }


def gpt2_config(cfg: ModelConfig, eot: int, dtype: str) -> dict[str, object]:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.max_seq_len,
        "n_embd": cfg.dim,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": cfg.dense_inter_dim,
        "activation_function": "gelu",  # exact GELU as moemla's, not GPT-2's tanh approximation
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "layer_norm_epsilon": 1e-5,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        **_common(cfg, eot, dtype),
    }


def gpt_neox_config(cfg: ModelConfig, eot: int, dtype: str) -> dict[str, object]:
    return {
        "architectures": ["GPTNeoXForCausalLM"],
        "model_type": "gpt_neox",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "intermediate_size": cfg.dense_inter_dim,
        "hidden_act": "gelu",
        "max_position_embeddings": cfg.max_seq_len,
        # NeoX's rotate_half pairs channels (i, i + D/2), as moemla's apply_rope does; all channels rotate
        "rotary_pct": 1.0,
        "rotary_emb_base": cfg.rope_base,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base, "partial_rotary_factor": 1.0},
        "layer_norm_eps": 1e-5,
        "use_parallel_residual": False,  # moemla's blocks are sequential: x + attn(ln1(x)), then + ffn(ln2(h))
        "attention_bias": True,
        "hidden_dropout": cfg.dropout,
        "attention_dropout": cfg.dropout,
        "tie_word_embeddings": True,
        **_common(cfg, eot, dtype),
    }


def gpt2_weights(model: Transformer) -> dict[str, torch.Tensor]:
    """moemla's dense MHA weights under GPT-2's names; GPT-2's Conv1D stores each matrix as (in, out)."""
    sd = model.state_dict()
    out = {
        "transformer.wte.weight": sd["wte.weight"],
        "transformer.wpe.weight": sd["wpe.weight"],
        "transformer.ln_f.weight": sd["ln_f.weight"],
        "transformer.ln_f.bias": sd["ln_f.bias"],
    }
    for i in range(model.cfg.n_layers):
        for ours, theirs in GPT2_NAMES.items():
            w, b = sd[f"blocks.{i}.{ours}.weight"], sd[f"blocks.{i}.{ours}.bias"]
            out[f"transformer.h.{i}.{theirs}.weight"] = w if ours.startswith("ln") else w.T
            out[f"transformer.h.{i}.{theirs}.bias"] = b
    return out


def gpt_neox_weights(model: Transformer) -> dict[str, torch.Tensor]:
    """moemla's dense MHA + RoPE weights under GPT-NeoX's names; NeoX lays q, k, v out per head."""
    sd, cfg = model.state_dict(), model.cfg
    h, d, c = cfg.n_heads, cfg.head_dim, cfg.dim
    out = {
        "gpt_neox.embed_in.weight": sd["wte.weight"],
        "gpt_neox.final_layer_norm.weight": sd["ln_f.weight"],
        "gpt_neox.final_layer_norm.bias": sd["ln_f.bias"],
    }
    for i in range(cfg.n_layers):
        pre = f"gpt_neox.layers.{i}"
        for ours, theirs in NEOX_NAMES.items():
            for kind in ("weight", "bias"):
                out[f"{pre}.{theirs}.{kind}"] = sd[f"blocks.{i}.{ours}.{kind}"]
        # ours: rows [q heads | k heads | v heads], (3, H, D); NeoX: per head [q | k | v], (H, 3, D)
        w, b = sd[f"blocks.{i}.attn.wqkv.weight"], sd[f"blocks.{i}.attn.wqkv.bias"]
        out[f"{pre}.attention.query_key_value.weight"] = w.view(3, h, d, c).transpose(0, 1).reshape(3 * c, c)
        out[f"{pre}.attention.query_key_value.bias"] = b.view(3, h, d).transpose(0, 1).reshape(3 * c)
    return out


def remote_weights(model: Transformer) -> dict[str, torch.Tensor]:
    """moemla's own names under `model.`; non-persistent buffers (RoPE tables, load counters) stay behind."""
    return {f"model.{k}": v for k, v in model.state_dict().items()}


def _cast(weights: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating weights in dtype, except the router (weight and balancing bias), which stays fp32."""
    return {
        k: (v if ".router." in k or ".mlp.gate." in k or not v.is_floating_point() else v.to(dtype)).contiguous()
        for k, v in weights.items()
    }


def write_tokenizer(tok: Tokenizer, out: Path, max_len: int) -> None:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOT,
        eos_token=EOT,
        pad_token=EOT,
        padding_side="left",  # batched generation pads on the left, as moemla's batched decoder does
        model_input_names=["input_ids", "attention_mask"],  # 4.x adds token_type_ids, which generate() refuses
        model_max_length=max_len,
    )
    fast.save_pretrained(str(out))


def export_hf(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    checkpoint: str | None = None,
    architecture: Architecture = "auto",
    dtype: str = "float32",
    overwrite: bool = False,
) -> dict[str, object]:
    """Write the run's checkpoint as a transformers model folder; returns a summary of what was written."""
    if dtype not in DTYPES:
        raise ExportError(f"--dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ExportError("export to Hugging Face needs transformers: pip install 'moemla[hf]'") from None
    run = RunFolder.open(run_dir)
    model, tok = run.load_model("cpu", checkpoint, finite=True), run.tokenizer()
    cfg = model.cfg
    native = native_architecture(cfg)
    blocker = native_blocker(cfg)[1]
    if architecture == "native" and native is None:
        raise ExportError(
            f"{variant_name(cfg) or 'this model'} has no exact native transformers architecture (the paper's dense "
            f"mha with biases: GPT-2, GPT-NeoX; --flavor deepseek: DeepSeek-V3, Llama; here {blocker}); use "
            "--architecture remote"
        )
    kind = native if architecture != "remote" and native else "remote"
    if kind == "remote":  # the remote code is a second implementation: it refuses what it does not implement
        try:
            check_portable(cfg, "the Hugging Face export's remote code", "export a model that keeps it at its "
                           f"default, or one transformers runs natively (DeepSeek-V3's block: {blocker})")  # fmt: skip
        except ConfigError as err:
            raise ExportError(str(err)) from None
    eot = tok.token_to_id(EOT)
    if eot is None:
        raise ExportError(f"the run's tokenizer has no {EOT} token, which export needs as eos")
    out = check_destination(out_dir, "export", sources=(run_dir,), overwrite=overwrite)
    with assembled(out, "export") as folder:
        write_hf_folder(model, tok, kind, dtype, Path(run_dir) / TOKENIZER_FILE, folder)
    return {"out": str(out), "architecture": kind, "variant": variant_name(cfg), "dtype": dtype, "run": str(run_dir)}


def write_hf_folder(model: Transformer, tok: Tokenizer, kind: str, dtype: str, tokenizer: Path, out: Path) -> None:
    """The Hugging Face folder at `out` (a new path). config.json comes last and lists every file written
    (moemla_files): the record by which a later `export --overwrite` knows the folder as its own."""
    cfg, eot = model.cfg, tok.token_to_id(EOT)
    out.mkdir(parents=True)
    config, weights = {
        "gpt2": (gpt2_config, gpt2_weights),
        "gpt_neox": (gpt_neox_config, gpt_neox_weights),
        DEEPSEEK: (deepseek_v3_config, deepseek_weights),
        LLAMA: (llama_hf_config, llama_weights),
        "remote": (remote_config, remote_weights),
    }[kind]
    save_safetensors(_cast(weights(model), DTYPES[dtype]), out / "model.safetensors", metadata={"format": "pt"})
    if kind == "remote":
        for name in REMOTE_FILES:
            shutil.copyfile(REMOTE / name, out / name)
    generation = {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot, **SamplingConfig().generation_config()}
    write_text_atomic(out / "generation_config.json", json.dumps(generation, indent=2) + "\n")
    write_tokenizer(tok, out, cfg.max_seq_len)
    # moemla's own tokenizer file, byte for byte: transformers rewrites tokenizer.json (a no-op post-processor),
    # and `moemla import` must hand back a run whose tokenizer digest matches the data it was trained on
    shutil.copyfile(tokenizer, out / MOEMLA_TOKENIZER)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    write_text_atomic(out / HF_CONFIG, json.dumps({**config(cfg, eot, dtype), "moemla_files": files}, indent=2) + "\n")
