"""int8 weights on the CPU engine: batch-1 decode speed against fp32, and what they cost in validation loss.

    python benchmarks/int8_cpu.py --preset xs --variants mha,moe-mla-rope,moe-mla-drope --rounds 3 \
        --runs runs/demo/moe-mla-rope runs/tinystories-moe

Speed: random weights (speed does not depend on training), `moemla bench`'s loop (prefill context - new
tokens, then new-tokens steps), fp32 and int8 interleaved in each round so both see the same machine; the
best of each is kept. Quality: each run's validation loss through the numpy engine, fp32 and int8, on the
same windows of its own prepared data. Prints tables, then one JSON line.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from moemla.config import ModelConfig
from moemla.data.shards import PreparedData, eval_batches
from moemla.inference.bench import bench
from moemla.inference.cpu.decoder import NumpyDecoder
from moemla.runs import RunFolder


def speed(preset: str, variants: list[str], rounds: int, context: int, new: int) -> list[dict[str, object]]:
    rows = []
    for v in variants:
        cfg = ModelConfig.from_preset(preset, v)
        best = {"none": 0.0, "int8": 0.0}
        memory = {}
        for _ in range(rounds):
            for q in ("none", "int8"):
                r = bench(cfg, 1, context, new, engine="numba", quantize=q, repeats=1)
                best[q] = max(best[q], float(r["decode_tokens_per_s"]))
                memory[q] = r["peak_memory_bytes"]
        rows.append({"variant": v, "fp32_tok_s": best["none"], "int8_tok_s": best["int8"],
                     "speedup": best["int8"] / best["none"], "fp32_MiB": memory["none"] / 2**20,
                     "int8_MiB": memory["int8"] / 2**20})  # fmt: skip
    return rows


def val_loss(dec: NumpyDecoder, windows: list[np.ndarray]) -> float:
    """Mean next-token cross-entropy over windows (T + 1,) of token ids."""
    total, n = 0.0, 0
    for w in windows:
        dec.reset()
        logits = dec.forward(w[:-1].tolist(), all_logits=True).astype(np.float64)  # (T, V)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        total -= logp[np.arange(len(w) - 1), w[1:]].sum()
        n += len(w) - 1
    return total / n


def quality(run: str, max_tokens: int) -> dict[str, object]:
    folder = RunFolder.open(run)
    model, train = folder.load_model(), folder.train_settings
    data = PreparedData.open(folder.meta["data"]["path"])
    windows = []
    for x, y in eval_batches(data.shards("val"), train["seq_len"], 1):
        windows.append(np.concatenate([x[0].numpy(), y[0, -1:].numpy()]))
        if len(windows) * train["seq_len"] >= max_tokens:
            break
    fp32 = val_loss(NumpyDecoder.from_model(model), windows)
    int8 = val_loss(NumpyDecoder.from_model(model, quantize="int8"), windows)
    return {"run": run, "tokens": len(windows) * train["seq_len"], "fp32_loss": fp32, "int8_loss": int8,
            "relative_change": int8 / fp32 - 1}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="xs")
    ap.add_argument("--variants", default="mha,moe-mla-rope,moe-mla-drope")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--runs", nargs="*", default=[], help="trained runs whose validation loss to compare")
    ap.add_argument("--max-tokens", type=int, default=16384, help="validation tokens per run")
    args = ap.parse_args()
    rows = speed(args.preset, args.variants.split(","), args.rounds, args.context, args.new_tokens)
    print(f"{args.preset}, numba engine, batch 1, context {args.context}, best of {args.rounds} interleaved rounds")
    print(f"{'variant':<15}{'fp32 tok/s':>12}{'int8 tok/s':>12}{'int8/fp32':>10}{'fp32 MiB':>10}{'int8 MiB':>10}")
    for r in rows:
        print(f"{r['variant']:<15}{r['fp32_tok_s']:>12.1f}{r['int8_tok_s']:>12.1f}{r['speedup']:>9.2f}x"
              f"{r['fp32_MiB']:>10.0f}{r['int8_MiB']:>10.0f}")  # fmt: skip
    losses = [quality(run, args.max_tokens) for run in args.runs]
    for q in losses:
        print(f"{q['run']}: val loss fp32 {q['fp32_loss']:.4f}, int8 {q['int8_loss']:.4f} "
              f"({q['relative_change']:+.2%}) over {q['tokens']:,} tokens")  # fmt: skip
    print(json.dumps({"speed": rows, "quality": losses}))


if __name__ == "__main__":
    main()
