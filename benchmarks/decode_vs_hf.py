"""Batch-1 greedy decode speed: moemla (numpy and torch engines) vs Hugging Face transformers' generate().

    pip install transformers    # an optional benchmark dependency, not needed by moemla
    python benchmarks/decode_vs_hf.py [--preset xs] [--prompt 448] [--new 64] [--repeats 3]

Decode tokens/s = (new - 1) / (time(prompt + new tokens) - time(prompt + 1 token)), so prefill is
excluded for all. Engines: `numpy` is moemla's NumpyDecoder, `torch` is moemla's Transformer, both
through `moemla.generate.generate_ids` with the same random weights. The equivalents: `mha` vs
GPT2LMHeadModel (learned positions, GELU MLP, tied head); `moe-mla-drope` and `moe-mla-rope` vs
DeepseekV3ForCausalLM with the same width, heads, experts (2 shared + 62 routed, top-6, expert
width d) and KV cache size (its one joint latent has rank 2r, our two latents r each; decoupled
RoPE channels as ours). Random weights, fp32. The memory-bandwidth bound is (active weight bytes +
cache bytes read per token) / copy bandwidth, with the copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, GPT2Config, GPT2LMHeadModel

from moemla import ModelConfig, Transformer
from moemla.accounting import active_params
from moemla.generate import generate_ids
from moemla.numpy_decoder import NumpyDecoder


def hf_model(cfg: ModelConfig) -> torch.nn.Module:
    if cfg.ffn == "dense":
        hf = GPT2Config(
            vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.dim, n_layer=cfg.n_layers,
            n_head=cfg.n_heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )  # fmt: skip
        return GPT2LMHeadModel(hf)
    hf = DeepseekV3Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.dense_inter_dim,
        moe_intermediate_size=cfg.expert_inter_dim, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_heads, n_shared_experts=cfg.n_shared_experts, n_routed_experts=cfg.n_routed_experts,
        num_experts_per_tok=cfg.n_activated_experts, n_group=1, topk_group=1, first_k_dense_replace=0,
        kv_lora_rank=2 * cfg.kv_lora_rank, q_lora_rank=None, qk_rope_head_dim=cfg.head_dim // 2,
        qk_nope_head_dim=cfg.head_dim, v_head_dim=cfg.head_dim, max_position_embeddings=cfg.max_seq_len,
        tie_word_embeddings=True, pad_token_id=0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return DeepseekV3ForCausalLM(hf)


def timed(fn: Callable[[], object], repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@torch.no_grad()
def decode_rates(cfg: ModelConfig, prompt_len: int, new: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    ours = Transformer(cfg.replace(dropout=0.0)).eval()
    theirs = hf_model(cfg).eval()
    prompt = torch.randint(1, cfg.vocab_size, (1, prompt_len))

    def hf(n: int) -> None:
        theirs.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    ours_np = NumpyDecoder.from_model(ours, max_len=prompt_len + new)

    def mine(n: int) -> None:
        generate_ids(ours, prompt[0].tolist(), n, temperature=0)

    def mine_np(n: int) -> None:
        generate_ids(ours_np, prompt[0].tolist(), n, temperature=0)

    rates = {}
    for name, fn in (("numpy", mine_np), ("torch", mine), ("transformers", hf)):
        time.sleep(0.5)  # let the previous engine's idle BLAS / OpenMP threads stop spinning
        rates[name] = (new - 1) / (timed(lambda fn=fn: fn(new), repeats) - timed(lambda fn=fn: fn(1), repeats))
    return rates


def copy_bandwidth() -> float:
    a = torch.randn(64 * 2**20 // 4)
    b = torch.empty_like(a)
    return 2 * a.numel() * 4 / timed(lambda: b.copy_(a), 5)  # bytes read + written per second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="xs")
    parser.add_argument("--variants", default="mha,moe-mla-drope,moe-mla-rope")
    parser.add_argument("--prompt", type=int, default=448, help="prompt tokens")
    parser.add_argument("--new", type=int, default=64, help="generated tokens (prompt + new <= context)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    bandwidth = copy_bandwidth()
    rows = []
    for v in args.variants.split(","):
        cfg = ModelConfig.from_preset(args.preset, v)
        rates = decode_rates(cfg, args.prompt, args.new, args.repeats)
        ctx = args.prompt + args.new / 2  # average positions read per step
        kv = ctx * (2 * cfg.kv_lora_rank if cfg.attention == "mla" else 2 * cfg.dim) * cfg.n_layers * 4
        bound = bandwidth / (active_params(cfg) * 4 + kv)
        rows.append(
            {
                "variant": v, "numpy_tokens_per_s": rates["numpy"], "torch_tokens_per_s": rates["torch"],
                "hf_tokens_per_s": rates["transformers"], "numpy_vs_hf": rates["numpy"] / rates["transformers"],
                "torch_vs_hf": rates["torch"] / rates["transformers"], "bandwidth_bound_tokens_per_s": bound,
                "numpy_of_bound": rates["numpy"] / bound, "torch_of_bound": rates["torch"] / bound,
            }
        )  # fmt: skip
    print(f"batch-1 greedy decode, {args.preset}, fp32, prompt {args.prompt} + {args.new} new tokens")
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s; {torch.get_num_threads()} threads, torch {torch.__version__}")
    head = ("variant", "numpy", "torch", "HF", "numpy/HF", "torch/HF", "bound", "numpy/bound", "torch/bound")
    print(f"{head[0]:<15}" + "".join(f"{h:>12}" for h in head[1:]) + "   (tokens/s)")
    for r in rows:
        print(
            f"{r['variant']:<15}{r['numpy_tokens_per_s']:>12.1f}{r['torch_tokens_per_s']:>12.1f}"
            f"{r['hf_tokens_per_s']:>12.1f}{r['numpy_vs_hf']:>11.2f}x{r['torch_vs_hf']:>11.2f}x"
            f"{r['bandwidth_bound_tokens_per_s']:>12.0f}{r['numpy_of_bound']:>12.0%}{r['torch_of_bound']:>12.0%}"
        )
    print(json.dumps({"benchmark": "decode_vs_hf", "copy_bandwidth": bandwidth, "rows": rows}))


if __name__ == "__main__":
    main()
