"""Training throughput and model-FLOPs utilization (MFU) of mha vs moe-mla-rope, measured side by side.

    python benchmarks/train_throughput.py [--cases tiny:4096,xs:50257] [--batch 8] [--repeats 5]

One training step = forward, backward and AdamW on a micro-batch of random tokens (speed does not
depend on the data). Model FLOPs per step = 3 x accounting.flops_per_token x tokens (backward ~ 2x
forward); MFU = model FLOPs/s over the fp32 matmul rate of this machine, measured in the same loop.
The steps of both variants and the matmul are interleaved so machine noise hits them alike.
Prints a table for people, then one line of JSON for machines.
"""

from __future__ import annotations

import argparse
import json
import platform
from collections.abc import Callable

import torch

from moe_layer import median_seconds
from moemla import ModelConfig, Transformer
from moemla.accounting import active_params, flops_per_token, total_params
from moemla.train.config import TrainConfig, build_optimizer

VARIANTS = ("mha", "moe-mla-rope")


def train_step(cfg: ModelConfig, batch: int) -> Callable[[], None]:
    torch.manual_seed(0)
    model = Transformer(cfg).train()
    optimizer = build_optimizer(model, TrainConfig())
    idx = torch.randint(0, cfg.vocab_size, (batch, cfg.max_seq_len + 1))

    def run() -> None:
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.update_routing_biases()

    return run


def bench_case(size: str, vocab: int, batch: int, seq: int, repeats: int) -> list[dict[str, object]]:
    configs = {v: ModelConfig.from_preset(size, v, vocab_size=vocab, max_seq_len=seq) for v in VARIANTS}
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    fns = {v: train_step(cfg, batch) for v, cfg in configs.items()}
    seconds = median_seconds({**fns, "matmul": lambda: a @ b}, repeats)
    rate = 2 * 2048**3 / seconds["matmul"]
    rows = []
    for v, cfg in configs.items():
        tokens_per_s = batch * seq / seconds[v]
        model_flops = tokens_per_s * 3 * flops_per_token(cfg, seq)
        rows.append(
            {
                "size": size, "vocab": vocab, "variant": v, "tokens_per_step": batch * seq,
                "total_params": total_params(cfg), "active_params": active_params(cfg),
                "step_ms": seconds[v] * 1e3, "tokens_per_s": tokens_per_s, "model_gflops": model_flops / 1e9,
                "matmul_gflops": rate / 1e9, "mfu": model_flops / rate,
            }
        )  # fmt: skip
    rows[1]["mfu_vs_mha"] = rows[1]["mfu"] / rows[0]["mfu"]
    rows[1]["time_vs_mha"] = rows[1]["step_ms"] / rows[0]["step_ms"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="tiny:4096,xs:50257", help="comma-separated SIZE:VOCAB")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rows = []
    for case in args.cases.split(","):
        size, vocab = case.split(":")
        rows += bench_case(size, int(vocab), args.batch, args.seq, args.repeats)
    print(f"training step (fwd+bwd+AdamW), fp32, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'size':<5}{'vocab':>7}{'variant':>14}{'params':>9}{'active':>9}{'tok/s':>9}{'MFU':>7}{'MFU vs mha':>12}")
    for r in rows:
        ratio = f"{r['mfu_vs_mha']:.2f}x" if "mfu_vs_mha" in r else "-"
        print(
            f"{r['size']:<5}{r['vocab']:>7}{r['variant']:>14}{r['total_params'] / 1e6:>8.1f}M"
            f"{r['active_params'] / 1e6:>8.1f}M{r['tokens_per_s']:>9,.0f}{r['mfu']:>7.1%}{ratio:>12}"
        )
    print(f"matmul rate (2048^3 fp32, same loop): {rows[0]['matmul_gflops']:.0f} GFLOP/s")
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.processor()}
    print(json.dumps({"benchmark": "train_throughput", **meta, "rows": rows}))


if __name__ == "__main__":
    main()
