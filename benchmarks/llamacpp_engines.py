"""llama.cpp beside moemla's CPU engines on the same weights: batch-1 and batch-16 decode, time to first token.

    pip install 'moemla[gguf,onnx,fast]' transformers
    python benchmarks/llamacpp_engines.py --presets tiny,xs --variants moe-mla-drope,mha-rope --batches 1,16

The DeepSeek flavor (the block llama.cpp runs), random weights (speed does not depend on training), `moemla
bench`'s shape at the preset's longest context: a prompt of context - 64 tokens, then 64 decode steps, best of
two runs after a warm-up, each row in its own process (`moemla bench --json`). llama.cpp rows run llama.cpp's own
decode loop on the weights exported to GGUF (f32, q8_0, q4_0; its default f16 cache and thread count = the cores
torch uses); numba and ONNX rows are moemla's engines (fp32, int8); torch is moemla's eager model; hf is
transformers' `generate()` on the native export of the same weights (DeepseekV3ForCausalLM, LlamaForCausalLM),
batch 1, decode tokens/s = (new - 1) / (time(new tokens) - time(1 token)). Prints a Markdown table and the ratios
the issue sets targets for, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ENGINES = [("llama.cpp", "none"), ("llama.cpp", "int8"), ("llama.cpp", "int4"), ("numba", "none"),
           ("numba", "int8"), ("onnx", "none"), ("onnx", "int8"), ("torch", "none")]  # fmt: skip
WEIGHTS = {("llama.cpp", "none"): "f32", ("llama.cpp", "int8"): "q8_0", ("llama.cpp", "int4"): "q4_0"}


def run(preset: str, variant: str, engine: str, quantize: str, batch: int, context: int, new: int) -> dict | None:
    argv = [sys.executable, "-m", "moemla", "bench", "--preset", preset, "--flavor", "deepseek", "--variants",
            variant, "--engine", engine, "--quantize", quantize, "--batch", str(batch), "--context", str(context),
            "--new-tokens", str(new), "--json"] + (["--device", "cpu"] if engine == "torch" else [])  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        print(f"{preset} {variant} {engine} {quantize} batch {batch}: {last}", file=sys.stderr)
        return None
    row = json.loads(done.stdout)[0]
    row["preset"], row["weights"] = preset, WEIGHTS.get((engine, quantize), "fp32" if quantize == "none" else quantize)
    return row


def hf_row(preset: str, variant: str, context: int, new: int) -> dict | None:
    """transformers' generate() on the native export of the same random weights (batch 1, greedy)."""
    try:
        import torch
        import transformers
    except ImportError:
        return None
    from moemla.config import ModelConfig
    from moemla.export.hf_native import deepseek_config, deepseek_weights, llama_config, llama_weights
    from moemla.model import Transformer

    cfg = ModelConfig.from_preset(preset, variant, "deepseek", dropout=0.0)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    llama = cfg.attention == "mha"
    config = (llama_config if llama else deepseek_config)(cfg, 0)
    kind = transformers.LlamaConfig if llama else transformers.DeepseekV3Config
    hf_cfg = kind(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
    hf = (transformers.LlamaForCausalLM if llama else transformers.DeepseekV3ForCausalLM)(hf_cfg).eval()
    hf.load_state_dict((llama_weights if llama else deepseek_weights)(model), strict=False)
    ids = torch.randint(1, cfg.vocab_size, (1, context - new), generator=torch.Generator().manual_seed(0))

    def timed(n: int) -> float:
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            with torch.no_grad():
                hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
            best = min(best, time.perf_counter() - t0)
        return best

    first, full = timed(1), timed(new)
    weight_bytes = 4 * sum(p.numel() for p in hf.parameters())
    return {"preset": preset, "variant": variant, "batch": 1, "engine": "hf generate()", "weights": "fp32",
            "prefill_tokens_per_s": (context - new) / first, "ttft_ms": 1e3 * first,
            "decode_tokens_per_s": (new - 1) / (full - first), "weight_bytes": weight_bytes,
            "transformers": transformers.__version__}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="tiny,xs")
    p.add_argument("--variants", default="moe-mla-drope,mha-rope")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--no-hf", action="store_true", help="skip transformers' generate() rows")
    args = p.parse_args()
    from moemla.config import ModelConfig
    from moemla.device import cpu_name

    rows = []
    for preset in args.presets.split(","):
        context = ModelConfig.from_preset(preset).max_seq_len  # the longest context
        for variant in args.variants.split(","):
            for batch in (int(b) for b in args.batches.split(",")):
                for engine, quantize in ENGINES:
                    if batch > 1 and engine == "numba":
                        continue  # one sequence at a time
                    r = run(preset, variant, engine, quantize, batch, context, args.new_tokens)
                    if r:
                        rows.append(r)
                        print(f"{preset} {variant} b{batch} {engine} {r['weights']}: decode "
                              f"{r['decode_tokens_per_s']:.1f} tok/s", file=sys.stderr, flush=True)  # fmt: skip
            if not args.no_hf and (r := hf_row(preset, variant, context, args.new_tokens)):
                rows.append(r)
    print(f"CPU: {cpu_name()}, {len(os.sched_getaffinity(0))} cores; {time.strftime('%Y-%m-%d')}")
    print("| preset | variant | batch | engine | weights | prefill tok/s | decode tok/s | TTFT ms | weights MiB |")
    print("|---|---|---:|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['preset']} | {r['variant']} | {r['batch']} | {r['engine']} | {r['weights']} | "
              f"{r['prefill_tokens_per_s']:,.0f} | {r['decode_tokens_per_s']:,.1f} | {r['ttft_ms']:.1f} | "
              f"{r['weight_bytes'] / 2**20:,.1f} |")  # fmt: skip
    print()
    print("| preset | variant | batch | best moemla engine | vs llama.cpp at equal precision |")
    print("|---|---|---:|---|---|")
    for preset, variant, batch in sorted({(r["preset"], r["variant"], r["batch"]) for r in rows}):
        sel = [r for r in rows if (r["preset"], r["variant"], r["batch"]) == (preset, variant, batch)]
        for ours_w, theirs_w in (("fp32", "f32"), ("int8", "q8_0")):
            ours = [r for r in sel if r["engine"] in ("numba", "onnx", "torch") and r["weights"] == ours_w]
            theirs = [r for r in sel if r["engine"] == "llama.cpp" and r["weights"] == theirs_w]
            if ours and theirs:
                best = max(ours, key=lambda r: r["decode_tokens_per_s"])
                ratio = best["decode_tokens_per_s"] / theirs[0]["decode_tokens_per_s"]
                print(f"| {preset} | {variant} | {batch} | {best['engine']} {ours_w} | {ratio:.2f}x of {theirs_w} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
