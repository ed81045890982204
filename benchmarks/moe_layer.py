"""Time one MoE layer forward+backward: grouped dispatch vs a naive per-expert loop vs the matmul rate.

    python benchmarks/moe_layer.py [--sizes xs,m] [--batch 8] [--seq 512] [--repeats 5]

Prints a table for people, then one line of JSON for machines. All three are measured side by side
in one process, so their ratios hold even when the machine is noisy.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from moemla import ModelConfig
from moemla.accounting import ffn_matmul_weights_per_token
from moemla.model.moe import MoE


def naive_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """The common loop (as HF Mixtral): per expert, find its tokens (a host sync), run, add back in place."""
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    gates, idx = moe.router(x)
    out = torch.zeros_like(x)
    for e in range(moe.experts.n_experts):
        token, slot = (idx == e).nonzero(as_tuple=True)
        if token.numel() == 0:
            continue
        h = F.gelu(x[token] @ moe.experts.w1[e]) @ moe.experts.w2[e]
        out.index_add_(0, token, h * gates[token, slot, None])
    if moe.shared is not None:
        out = out + moe.shared(x)
    return out.view(shape)


def median_seconds(fns: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median wall time of each function, run interleaved (a, b, a, b, ...) so drift hits all alike."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_size(size: str, batch: int, seq: int, repeats: int) -> dict[str, object]:
    cfg = ModelConfig.from_preset(size, "moe-mla-rope", dropout=0.0)
    torch.manual_seed(0)
    moe = MoE(cfg).train()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(batch, seq, cfg.dim, requires_grad=True)
    upstream = torch.randn(batch, seq, cfg.dim)

    def step(forward: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            (forward(x) * upstream).sum().backward()
            moe.zero_grad(set_to_none=True)
            x.grad = None

        return run

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    seconds = median_seconds(
        {"grouped": step(moe), "naive": step(lambda t: naive_moe(moe, t)), "matmul": lambda: a @ b}, repeats
    )
    grouped, naive = seconds["grouped"], seconds["naive"]
    rate = 2 * 2048**3 / seconds["matmul"]  # the machine's fp32 matmul rate, measured in the same loop
    flops = 3 * batch * seq * 2 * ffn_matmul_weights_per_token(cfg)  # forward 2 FLOPs/MAC; backward ~ 2x
    return {
        "size": size,
        "dim": cfg.dim,
        "tokens": batch * seq,
        "experts": f"{cfg.n_shared_experts}+{cfg.n_routed_experts} top-{cfg.n_activated_experts}",
        "grouped_ms": grouped * 1e3,
        "naive_ms": naive * 1e3,
        "speedup_vs_naive": naive / grouped,
        "grouped_gflops": flops / grouped / 1e9,
        "matmul_gflops": rate / 1e9,
        "fraction_of_matmul_rate": flops / grouped / rate,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="xs,m", help="comma-separated size presets (layer shapes)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()

    rows = [bench_size(s, args.batch, args.seq, args.repeats) for s in args.sizes.split(",")]
    print(f"MoE layer forward+backward, fp32, {torch.get_num_threads()} threads, torch {torch.__version__}")
    header = f"{'size':<5}{'d':>5}{'tokens':>8}{'grouped ms':>12}{'naive ms':>10}{'speedup':>9}"
    header += f"{'GFLOP/s':>9}{'matmul GFLOP/s':>16}{'of matmul':>11}"
    print(header)
    for r in rows:
        print(
            f"{r['size']:<5}{r['dim']:>5}{r['tokens']:>8}{r['grouped_ms']:>12.1f}{r['naive_ms']:>10.1f}"
            f"{r['speedup_vs_naive']:>8.2f}x{r['grouped_gflops']:>9.1f}{r['matmul_gflops']:>16.1f}"
            f"{r['fraction_of_matmul_rate']:>10.0%}"
        )
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.processor()}
    print(json.dumps({"benchmark": "moe_layer", **meta, "rows": rows}))


if __name__ == "__main__":
    main()
