"""Generating for a list of prompts: one batch (left-padded, torch) vs one prompt at a time (each engine).

    python benchmarks/batched_generate.py [--preset xs] [--variants mha,moe-mla-drope] [--prompts 16] [--new 64]

Prompts of random lengths from 16 to --max-prompt tokens, random weights, greedy, no stop token, so
every prompt generates --new tokens. Reports generated tokens per second of
wall time (prefill included), all engines in one process, interleaved, best of --repeats. The
batch also checks its tokens against the one-by-one torch run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time

import torch

from moemla import ModelConfig, Transformer
from moemla.inference.cpu.decoder import NumpyDecoder
from moemla.inference.generate import generate_ids, generate_ids_batch
from moemla.inference.sampling import greedy


def one_by_one(model: Transformer | NumpyDecoder, prompts: list[list[int]], new: int) -> list[list[int]]:
    return [generate_ids(model, p, greedy(new)) for p in prompts]


def measure(model: Transformer, prompts: list[list[int]], new: int, repeats: int) -> tuple[dict[str, float], bool]:
    """Best wall seconds per engine, and whether the batch drew the one-by-one torch tokens."""
    engines = {
        "torch, batch": lambda: generate_ids_batch(model, prompts, greedy(new)),
        "torch, one by one": lambda: one_by_one(model, prompts, new),
    }
    decoders = {"numpy": NumpyDecoder.from_model(model)}
    if importlib.util.find_spec("numba"):
        decoders["numba"] = NumpyDecoder.from_model(model, compiled=True)
    for name, dec in decoders.items():
        engines[f"{name}, one by one"] = lambda dec=dec: one_by_one(dec, prompts, new)
    outputs = {name: fn() for name, fn in engines.items()}  # warm-up (and numba's compile)
    best = dict.fromkeys(engines, float("inf"))
    for _ in range(repeats):
        for name, fn in engines.items():
            time.sleep(0.5)  # let idle BLAS / OpenMP threads stop spinning
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best, outputs["torch, batch"] == outputs["torch, one by one"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="xs")
    parser.add_argument("--variants", default="mha,moe-mla-drope,moe-mla-rope")
    parser.add_argument("--prompts", type=int, default=16, help="prompts (the batch size)")
    parser.add_argument("--new", type=int, default=64, help="tokens generated per prompt")
    parser.add_argument("--max-prompt", type=int, default=256, help="longest prompt")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    rows = []
    for v in args.variants.split(","):
        torch.manual_seed(0)
        cfg = ModelConfig.from_preset(args.preset, v, dropout=0.0)
        model = Transformer(cfg).eval()
        lengths = torch.randint(16, args.max_prompt + 1, (args.prompts,)).tolist()
        prompts = [torch.randint(0, cfg.vocab_size, (n,)).tolist() for n in lengths]
        best, same = measure(model, prompts, args.new, args.repeats)
        for name, seconds in best.items():
            rows.append({"variant": v, "engine": name, "tokens_per_s": args.prompts * args.new / seconds})
        print(f"{v}: batch tokens equal one-by-one torch tokens: {same}")
    print(f"{args.preset}, fp32, {args.prompts} prompts of 16-{args.max_prompt} tokens, {args.new} new each, greedy")
    print(f"{'variant':<15}{'engine':<20}{'tokens/s':>10}")
    for r in rows:
        print(f"{r['variant']:<15}{r['engine']:<20}{r['tokens_per_s']:>10.1f}")
    print(json.dumps({"benchmark": "batched_generate", "rows": rows}))


if __name__ == "__main__":
    main()
