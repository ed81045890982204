"""The fixed-shape decode step a CUDA graph captures, run eagerly: what it costs where launches are cheap.

    python benchmarks/static_step.py --preset xs --batch 16 --prompt 448 --steps 32

TorchDecoder in eager mode against mode static (every step attends over all slots of its bucket's cache
under a mask) and the static step compiled (compile=True: traced once per bucket), random weights, fp32,
best of 2 (the first run of the compiled decoder includes its compile), decode tokens/s.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from moemla.config import ModelConfig
from moemla.inference.torch_decoder import TorchDecoder
from moemla.model import Transformer


def rate(dec: TorchDecoder, prompts: list[list[int]], steps: int, context: int) -> float:
    best = 0.0
    for _ in range(2):
        dec.prefill(prompts, context)
        t0 = time.perf_counter()
        for i in range(steps):
            dec.step([i] * len(prompts))
        best = max(best, len(prompts) * steps / (time.perf_counter() - t0))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="xs")
    ap.add_argument("--variants", default="mha,moe-mla-drope,moe-mla-rope")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=448)
    ap.add_argument("--steps", type=int, default=32)
    args = ap.parse_args()
    rows = []
    for v in args.variants.split(","):
        torch.manual_seed(0)
        cfg = ModelConfig.from_preset(args.preset, v, dropout=0.0)
        model = Transformer(cfg).eval()
        prompts = torch.randint(0, cfg.vocab_size, (args.batch, args.prompt)).tolist()
        context = args.prompt + args.steps
        compiled = TorchDecoder(model, compile=True)
        row = {"variant": v, "eager": rate(TorchDecoder(model), prompts, args.steps, context),
               "static": rate(TorchDecoder(model, mode="static"), prompts, args.steps, context),
               "static_compiled": rate(compiled, prompts, args.steps, context)}  # fmt: skip
        rows.append(row)
        print(f"{v:<15} eager {row['eager']:8.0f}  static {row['static']:8.0f} ({row['static'] / row['eager']:.2f}x)"
              f"  static+compile {row['static_compiled']:8.0f} tok/s", flush=True)  # fmt: skip
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
