"""Batch-1 greedy decode speed: moemla (numba, numpy and torch engines) vs Hugging Face transformers' generate().

    pip install transformers numba   # optional: the benchmark extra, and moemla[fast] for the numba engine
    python benchmarks/decode_vs_hf.py [--preset xs] [--prompt 448] [--new 64] [--repeats 3]

Decode tokens/s = (new - 1) / (time(prompt + new tokens) - time(prompt + 1 token)), so prefill is
excluded for all. Engines: `numba` is moemla's NumpyDecoder with its compiled one-token kernels (`int8`:
the same with int8 weights, its bound counting a byte per weight),
`numpy` the same decoder without them, `torch` is moemla's Transformer, all through
`moemla.inference.generate.generate_ids` with the same random weights. The equivalents: `mha` vs
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
from moemla.inference.cpu.decoder import NumpyDecoder
from moemla.inference.generate import generate_ids
from moemla.inference.sampling import greedy

ENGINES = ("numba", "int8", "numpy", "torch")  # int8: the numba engine with int8 weights (--quantize int8)


def hf_model(cfg: ModelConfig) -> torch.nn.Module:
    """The HF equivalent of a moemla config, same shapes and dropout (benchmarks/train_throughput.py trains it)."""
    if cfg.ffn == "dense":
        hf = GPT2Config(
            vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.dim, n_layer=cfg.n_layers,
            n_head=cfg.n_heads, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
        )  # fmt: skip
        return GPT2LMHeadModel(hf)
    hf = DeepseekV3Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.dense_inter_dim,
        moe_intermediate_size=cfg.expert_inter_dim, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_heads, n_shared_experts=cfg.n_shared_experts, n_routed_experts=cfg.n_routed_experts,
        num_experts_per_tok=cfg.n_activated_experts, n_group=1, topk_group=1, first_k_dense_replace=0,
        kv_lora_rank=2 * cfg.kv_lora_rank, q_lora_rank=None, qk_rope_head_dim=cfg.head_dim // 2,
        qk_nope_head_dim=cfg.head_dim, v_head_dim=cfg.head_dim, max_position_embeddings=cfg.max_seq_len,
        tie_word_embeddings=True, pad_token_id=0, bos_token_id=0, eos_token_id=0, attention_dropout=cfg.dropout,
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

    engines = {
        "numba": NumpyDecoder.from_model(ours, max_len=prompt_len + new, compiled=True),
        "int8": NumpyDecoder.from_model(ours, max_len=prompt_len + new, compiled=True, quantize="int8"),
        "numpy": NumpyDecoder.from_model(ours, max_len=prompt_len + new),
        "torch": ours,
    }

    def mine(n: int, engine: str) -> None:
        generate_ids(engines[engine], prompt[0].tolist(), greedy(n))

    rates = {}
    runs = [(name, lambda n, name=name: mine(n, name)) for name in engines] + [("transformers", hf)]
    for name, fn in runs:
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
        bound_int8 = bandwidth / (active_params(cfg) + kv)  # a byte per weight; the fp32 cache is read as before
        row: dict[str, object] = {"variant": v, "hf_tokens_per_s": rates["transformers"]}
        row["bandwidth_bound_tokens_per_s"] = bound
        for e in ENGINES:
            row[f"{e}_tokens_per_s"] = rates[e]
            row[f"{e}_vs_hf"] = rates[e] / rates["transformers"]
            row[f"{e}_of_bound"] = rates[e] / (bound_int8 if e == "int8" else bound)
        rows.append(row)
    print(f"batch-1 greedy decode, {args.preset}, fp32, prompt {args.prompt} + {args.new} new tokens")
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s; {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'tokens/s':<15}" + "".join(f"{h:>9}" for h in (*ENGINES, "HF", "bound")), end="")
    print("".join(f"{e + '/HF':>11}" for e in ENGINES) + "".join(f"{e + '/bound':>13}" for e in ENGINES))
    for r in rows:
        print(f"{r['variant']:<15}" + "".join(f"{r[f'{e}_tokens_per_s']:>9.1f}" for e in ENGINES), end="")
        print(f"{r['hf_tokens_per_s']:>9.1f}{r['bandwidth_bound_tokens_per_s']:>9.0f}", end="")
        print("".join(f"{r[f'{e}_vs_hf']:>10.2f}x" for e in ENGINES), end="")
        print("".join(f"{r[f'{e}_of_bound']:>13.0%}" for e in ENGINES))
    print(json.dumps({"benchmark": "decode_vs_hf", "copy_bandwidth": bandwidth, "rows": rows}))


if __name__ == "__main__":
    main()
