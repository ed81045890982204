"""`moemla import`: a folder written by `moemla export --format hf` (and perhaps fine-tuned since) as a moemla run."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from moemla.config import ConfigError, ModelConfig
from moemla.data.tokenizer import digest, load_tokenizer
from moemla.export.hf import GPT2_NAMES, MOEMLA_TOKENIZER, NEOX_NAMES, ExportError
from moemla.export.hf_native import DEEPSEEK, LLAMA, from_native
from moemla.folders import TOKENIZER_FILE, assembled, check_destination
from moemla.model import Transformer
from moemla.runs import RunFolder


def _from_remote(weights: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    return {k.removeprefix("model."): v for k, v in weights.items()}


def _from_gpt2(weights: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {"wte.weight": weights["transformer.wte.weight"], "wpe.weight": weights["transformer.wpe.weight"]}
    out |= {f"ln_f.{k}": weights[f"transformer.ln_f.{k}"] for k in ("weight", "bias")}
    for i in range(cfg.n_layers):
        for ours, theirs in GPT2_NAMES.items():
            w = weights[f"transformer.h.{i}.{theirs}.weight"]
            out[f"blocks.{i}.{ours}.weight"] = w if ours.startswith("ln") else w.T  # Conv1D stores (in, out)
            out[f"blocks.{i}.{ours}.bias"] = weights[f"transformer.h.{i}.{theirs}.bias"]
    return out


def _from_gpt_neox(weights: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    h, d, c = cfg.n_heads, cfg.head_dim, cfg.dim
    out = {"wte.weight": weights["gpt_neox.embed_in.weight"]}
    out |= {f"ln_f.{k}": weights[f"gpt_neox.final_layer_norm.{k}"] for k in ("weight", "bias")}
    for i in range(cfg.n_layers):
        pre = f"gpt_neox.layers.{i}"
        for ours, theirs in NEOX_NAMES.items():
            for kind in ("weight", "bias"):
                out[f"blocks.{i}.{ours}.{kind}"] = weights[f"{pre}.{theirs}.{kind}"]
        # NeoX: per head [q | k | v], (H, 3, D); ours: [q heads | k heads | v heads], (3, H, D)
        w, b = weights[f"{pre}.attention.query_key_value.weight"], weights[f"{pre}.attention.query_key_value.bias"]
        out[f"blocks.{i}.attn.wqkv.weight"] = w.view(h, 3, d, c).transpose(0, 1).reshape(3 * c, c)
        out[f"blocks.{i}.attn.wqkv.bias"] = b.view(h, 3, d).transpose(0, 1).reshape(3 * c)
    return out


def check_fits(src: Path, state: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """Every tensor the config needs, at the config's shape; else one line naming the first that is not."""
    missing = sorted(set(want) - set(state))
    if missing:
        raise ExportError(f"{src}: the weights do not fit its moemla_config (no tensor {missing[0]!r})")
    wrong = [k for k in want if state[k].shape != want[k].shape]
    if wrong:
        k = wrong[0]
        raise ExportError(
            f"{src}: the weights do not fit its moemla_config: {k} is {tuple(state[k].shape)} in the file but "
            f"{tuple(want[k].shape)} for the config ({len(wrong)} tensor(s) differ); export it again"
        )


READERS = {"moemla": _from_remote, "gpt2": _from_gpt2, "gpt_neox": _from_gpt_neox, DEEPSEEK: from_native,
           LLAMA: from_native}  # fmt: skip


IMPORTED_SEQ_LEN = 512  # §3.3's sequence length, cut to the model's context


def import_hf(folder: str | Path, run_dir: str | Path, *, overwrite: bool = False) -> dict[str, object]:
    """Write `run_dir` (run.json, tokenizer, one checkpoint at step 0) from an exported Hugging Face folder."""
    src, out = Path(folder), Path(run_dir)
    config_path = src / "config.json"
    if not config_path.is_file():
        raise ExportError(f"{src} has no config.json; give a folder written by `moemla export`")
    hf = json.loads(config_path.read_text())
    if "moemla_config" not in hf or hf.get("model_type") not in READERS:
        raise ExportError(f"{config_path} was not written by `moemla export` (no moemla_config, or another model)")
    try:
        cfg = ModelConfig.from_dict(hf["moemla_config"])
    except (ConfigError, TypeError) as err:
        raise ExportError(f"{config_path}: {err}") from None
    shards = sorted(src.glob("*.safetensors"))
    if not shards:
        raise ExportError(f"{src} has no .safetensors weights")
    weights: dict[str, torch.Tensor] = {}
    for shard in shards:
        try:
            weights |= load_file(str(shard))
        except (SafetensorError, OSError) as err:
            why = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ExportError(f"{shard} is truncated or not a safetensors file ({why}); export it again") from None
    model = Transformer(cfg)
    try:
        state = {k: v.float() for k, v in READERS[hf["model_type"]](weights, cfg).items()}
    except (KeyError, RuntimeError) as err:
        raise ExportError(f"{src}: the weights do not fit its moemla_config (no tensor {err})") from None
    check_fits(src, state, model.state_dict())
    model.load_state_dict(state)
    check_destination(out, "import", sources=(src,), overwrite=overwrite)
    tok_file = src / MOEMLA_TOKENIZER if (src / MOEMLA_TOKENIZER).is_file() else src / TOKENIZER_FILE
    tok = load_tokenizer(str(tok_file))
    meta = {
        "model": cfg.to_dict(),
        # what import knows of training; `moemla train --resume` fills the rest with its defaults
        "train": {"seq_len": min(IMPORTED_SEQ_LEN, cfg.max_seq_len)},
        "data": {"path": str(src.resolve()), "tokenizer_sha256": digest(tok), "vocab_size": tok.get_vocab_size()},
        "imported_from": str(src.resolve()),
    }
    with assembled(out, "import") as folder:
        run = RunFolder(folder)
        run.write_meta(meta)
        run.write_tokenizer(tok_file)
        run.save_checkpoint(0, model, {}, {"step": 0, "elapsed_s": 0.0}, keep=1)
    return {"run": str(out), "variant": hf.get("moemla_variant"), "from": str(src), "architecture": hf["model_type"]}
