"""CPU training step: moemla's dropout (15-bit masks, attention with dropout) against PyTorch's, and no dropout.

    python benchmarks/cpu_dropout.py [--cases tiny:3303,xs:4096] [--variants mha,moe-mla-rope] [--batch 16]
        [--seq 256] [--dropout 0.1] [--repeats 7]

§3.3's recipe trains with dropout 0.1. On the CPU PyTorch draws one Mersenne-twister number per masked
element, and scaled_dot_product_attention with dropout leaves its fused kernel for a materialized path.
moemla.model.dropout draws four 15-bit uniforms per 64-bit number and computes causal attention with
dropout itself. Three training steps per case, interleaved so machine noise hits them alike:
  ours:       moemla as shipped (the CPU path of moemla.model.dropout)
  torch:      the same model with PyTorch's F.dropout and SDPA(dropout_p) (the path before this change)
  no-dropout: dropout 0, the floor any dropout path can reach
Step = forward, backward, clipping, AdamW on random tokens (train_throughput.our_step). Prints a table,
then one line of JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
from collections.abc import Callable, Iterator

import torch

import moemla.model.attention as attention
import moemla.model.dropout as dropout
from moe_layer import median_seconds
from moemla import ModelConfig
from train_throughput import our_step


@contextlib.contextmanager
def torch_dropout() -> Iterator[None]:
    """moemla's model with PyTorch's dropout everywhere: the CPU path switched off."""
    saved = dropout.fast, attention.fast_dropout
    dropout.fast = attention.fast_dropout = lambda *_: False
    try:
        yield
    finally:
        dropout.fast, attention.fast_dropout = saved


def under(ctx: Callable[[], contextlib.AbstractContextManager], run: Callable[[], None]) -> Callable[[], None]:
    def wrapped() -> None:
        with ctx():
            run()

    return wrapped


def bench(size: str, vocab: int, variant: str, args: argparse.Namespace) -> dict[str, object]:
    cfg = ModelConfig.from_preset(size, variant, vocab_size=vocab, max_seq_len=args.seq, dropout=args.dropout)
    torch.manual_seed(0)
    idx = torch.randint(0, vocab, (args.batch, args.seq + 1))
    steps = {
        "ours": our_step(idx, cfg, None, compile=False),
        "torch": under(torch_dropout, our_step(idx, cfg, None, compile=False)),
        "no-dropout": our_step(idx, cfg.replace(dropout=0.0), None, compile=False),
    }
    s = median_seconds(steps, args.repeats, torch.device("cpu"))
    return {"size": size, "vocab": vocab, "variant": variant, **{f"{k}_s": v for k, v in s.items()},
            "speedup_vs_torch": s["torch"] / s["ours"]}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default="tiny:3303", help="size:vocab pairs (3303: the built-in corpus's BPE)")
    p.add_argument("--variants", default="mha,moe-mla-rope")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    rows = []
    for case in args.cases.split(","):
        size, vocab = case.split(":")
        for variant in args.variants.split(","):
            rows.append(bench(size, int(vocab), variant, args))
    cpu = platform.processor() or platform.machine()
    print(f"CPU training step, batch {args.batch} x {args.seq}, dropout {args.dropout}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, {cpu}")  # fmt: skip
    print("| size | variant | ours | PyTorch's dropout | no dropout | ours vs PyTorch's |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['size']} | {r['variant']} | {r['ours_s']:.3f} s | {r['torch_s']:.3f} s | "
              f"{r['no-dropout_s']:.3f} s | {r['speedup_vs_torch']:.2f}x |")  # fmt: skip
    print(json.dumps({"benchmark": "cpu_dropout", "args": vars(args), "rows": rows}))


if __name__ == "__main__":
    main()
