"""Training throughput and model-FLOPs utilization (MFU): moemla's variants, Hugging Face anchors, and the loop.

    python benchmarks/train_throughput.py [--cases tiny:4096,xs:50257] [--batch 8] [--seq 256] [--repeats 5]
    python benchmarks/train_throughput.py --cases tiny:4096 --matched --variants mha,mla,moe-mla-rope
    python benchmarks/train_throughput.py --device cuda --dtype bf16 --compile --hf --loop \
        --cases xs:50257,m:50257 --batch 64 --seq 512

One training step = forward, backward, gradient clipping and AdamW (plus the bias update for MoE)
on one batch of random tokens, under autocast for --dtype bf16. (With --loop the batch is the loop's
first batch of the built-in corpus instead: real text routes less evenly than random tokens at first,
which changes MoE step times, so the loop and the steps are compared on the same text.)
Model FLOPs per step = 3 x accounting.flops_per_token x tokens (backward ~ 2x forward); MFU = model
FLOPs/s over the matmul rate of this machine in the same dtype, measured in the same loop. All
steps and the matmul are interleaved so machine noise hits them alike.

--hf adds Hugging Face anchors at the same shapes in the same loop: GPT2LMHeadModel for mha and
DeepseekV3ForCausalLM for moe-mla-rope (shapes as benchmarks/decode_vs_hf.py; always eager).
--loop then runs `moemla train` itself (moemla.train.loop.train) at the same shape for --loop-steps
and reports its own tokens/s from metrics.jsonl against the benchmark's step rate: what data
loading, host syncs and bookkeeping cost. Prints a table for people, then one line of JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from moe_layer import median_seconds
from moemla import ModelConfig, Transformer
from moemla.accounting import active_params, flops_per_token, total_params
from moemla.train.config import TrainConfig, build_optimizer

DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def our_step(idx: torch.Tensor, cfg: ModelConfig, dtype: torch.dtype | None, compile: bool) -> Callable:
    """One training step of moemla's model on the tokens idx (B, T + 1)."""
    device = idx.device
    torch.manual_seed(0)
    model = Transformer(cfg).to(device).train()
    fwd = torch.compile(model) if compile else model
    optimizer = build_optimizer(model, TrainConfig())

    def run() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            _, loss = fwd(idx[:, :-1], idx[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.routing_bias_step()
        _sync(device)

    return run


def hf_step(idx: torch.Tensor, cfg: ModelConfig, dtype: torch.dtype | None) -> tuple[Callable, int]:
    """The HF equivalent's training step on the same tokens, and its parameter count (its own, not ours)."""
    from decode_vs_hf import hf_model  # needs transformers (the bench extra)

    device, idx = idx.device, idx[:, :-1]  # HF shifts the labels itself
    torch.manual_seed(0)
    model = hf_model(cfg).to(device).train()  # same dropout as ours
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)

    def run() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = model(input_ids=idx, labels=idx).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)

    return run, sum(p.numel() for p in model.parameters())


def matmul(device: torch.device, dtype: torch.dtype | None) -> tuple[Callable, int]:
    """A square matmul in the training dtype and its FLOPs: the machine's rate, for MFU."""
    n = 4096 if device.type == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device, dtype=dtype or torch.float32) for _ in range(2))

    def run() -> None:
        a @ b
        _sync(device)

    return run, 2 * n**3


def batch_tokens(args: argparse.Namespace, vocab: int, data: Path | None) -> torch.Tensor:
    """(B, T + 1) tokens: random, or with --loop the loop's first batch, so routing sees the same text."""
    if data is None:
        torch.manual_seed(0)
        return torch.randint(0, vocab, (args.batch, args.seq + 1))
    from moemla.data.shards import PreparedData, train_batch

    shards = PreparedData.open(data).shards("train")
    x, y = train_batch(shards, args.seq, seed=1337, step=0, batch=args.batch, rows=slice(None))
    return torch.cat([x, y[:, -1:]], dim=1)


def loop_tokens_per_s(cfg: ModelConfig, args: argparse.Namespace, data: Path, run_dir: Path) -> float:
    """moemla's own training loop at the benchmark's shape: the median tokens/s it records, warm-up excluded."""
    from moemla.runs import RunFolder
    from moemla.train.loop import train

    amp = "bf16" if args.dtype == "bf16" else "none"
    tc = TrainConfig(
        max_steps=args.loop_steps, batch_size=args.batch, micro_batch_size=args.batch, seq_len=args.seq,
        device=args.device, amp=amp, compile=args.compile, eval_interval=10**9, ckpt_interval=10**9,
        eval_tokens=args.seq, log_interval=1,
    )  # fmt: skip
    train(data, run_dir, cfg, tc, log=lambda _: None)
    rates = [r["tokens_per_s"] for r in RunFolder(run_dir).metrics() if r["split"] == "train"]
    return statistics.median(rates[2:] or rates)


def bench_case(size: str, vocab: int, args: argparse.Namespace, data: Path | None) -> list[dict[str, object]]:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    configs = {
        v: ModelConfig.from_preset(size, v, vocab_size=vocab, max_seq_len=args.seq) for v in args.variants.split(",")
    }
    if args.matched:  # as `moemla reproduce table2` trains them: each variant within 2% of dense MHA's parameters
        from moemla.experiments.tables import table2_specs

        specs = table2_specs({size: ModelConfig.from_preset(size, "moe-mla-rope", vocab_size=vocab,
                                                            max_seq_len=args.seq)}, [0])  # fmt: skip
        configs = {v: next(s.cfg for s in specs if s.name == v) for v in configs}
    idx = batch_tokens(args, vocab, data).to(device)
    fns: dict[str, Callable] = {v: our_step(idx, cfg, dtype, args.compile) for v, cfg in configs.items()}
    hf_params = {}
    if args.hf:
        for v, cfg in configs.items():
            fns[f"hf:{v}"], hf_params[v] = hf_step(idx, cfg, dtype)
    mm, mm_flops = matmul(device, dtype)
    seconds = median_seconds({**fns, "matmul": mm}, args.repeats, device)
    rate = mm_flops / seconds["matmul"]
    rows = []
    for name in fns:
        v = name.removeprefix("hf:")
        cfg = configs[v]
        tokens_per_s = args.batch * args.seq / seconds[name]
        model_flops = tokens_per_s * 3 * flops_per_token(cfg, args.seq)
        rows.append(
            {
                "size": size, "vocab": vocab, "variant": v, "impl": "hf" if name.startswith("hf:") else "moemla",
                "tokens_per_step": args.batch * args.seq,
                "total_params": hf_params[v] if name.startswith("hf:") else total_params(cfg),
                "active_params": active_params(cfg), "step_ms": seconds[name] * 1e3, "tokens_per_s": tokens_per_s,
                "model_gflops": model_flops / 1e9, "matmul_gflops": rate / 1e9, "mfu": model_flops / rate,
            }
        )  # fmt: skip
    ours = {r["variant"]: r for r in rows if r["impl"] == "moemla"}
    for r in rows:
        if "mha" in ours:
            r["tokens_vs_mha"] = r["tokens_per_s"] / ours["mha"]["tokens_per_s"]  # type: ignore[operator]
        if r["impl"] == "hf":
            ours[r["variant"]]["vs_hf"] = ours[r["variant"]]["tokens_per_s"] / r["tokens_per_s"]  # type: ignore[operator]
    if data is not None:
        with tempfile.TemporaryDirectory() as tmp:
            for v, cfg in configs.items():
                loop = loop_tokens_per_s(cfg, args, data, Path(tmp) / v)
                ours[v]["loop_tokens_per_s"] = loop
                ours[v]["loop_vs_bench"] = loop / ours[v]["tokens_per_s"]  # type: ignore[operator]
    return rows


def _prepare(tmp: str) -> Path:
    from moemla.data.shards import write_prepared
    from moemla.data.sources import builtin_source

    out = Path(tmp) / "builtin"
    write_prepared(builtin_source(2000), out, {"dataset": "builtin", "stories": 2000}, vocab_size=1024)
    return out


def _fmt(r: dict[str, object], key: str, fmt: str) -> str:
    return format(r[key], fmt) if key in r else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="tiny:4096,xs:50257", help="comma-separated SIZE:VOCAB")
    parser.add_argument("--variants", default="mha,moe-mla-rope", help="comma-separated moemla variants")
    parser.add_argument("--matched", action="store_true", help="parameter-match each variant to mha, as table2 does")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="fp32, or bf16 autocast")
    parser.add_argument("--compile", action="store_true", help="torch.compile moemla's models (HF stays eager)")
    parser.add_argument("--hf", action="store_true", help="add HF GPT2 / DeepseekV3 at the same shapes")
    parser.add_argument("--loop", action="store_true", help="also time `moemla train` at the same shape")
    parser.add_argument("--loop-steps", type=int, default=12, help="steps of the training loop with --loop")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = _prepare(tmp) if args.loop else None
        for case in args.cases.split(","):
            size, vocab = case.split(":")
            rows += bench_case(size, int(vocab), args, data)
    mode = f"{args.dtype}{', compiled' if args.compile else ''}"
    shape = f"batch {args.batch} x {args.seq}"
    print(f"training step (fwd+bwd+AdamW), {args.device}, {mode}, {shape}, torch {torch.__version__}")
    head = ("size", "vocab", "variant", "impl", "params", "active", "tok/s", "MFU", "vs mha", "vs HF", "loop/bench")
    print(f"{head[0]:<5}{head[1]:>7}{head[2]:>14}{head[3]:>8}" + "".join(f"{h:>11}" for h in head[4:]))
    for r in rows:
        print(
            f"{r['size']:<5}{r['vocab']:>7}{r['variant']:>14}{r['impl']:>8}{r['total_params'] / 1e6:>10.1f}M"
            f"{r['active_params'] / 1e6:>10.1f}M{r['tokens_per_s']:>11,.0f}{r['mfu']:>11.1%}"
            f"{_fmt(r, 'tokens_vs_mha', '.2f'):>11}{_fmt(r, 'vs_hf', '.2f'):>11}{_fmt(r, 'loop_vs_bench', '.2f'):>11}"
        )
    print(f"matmul rate ({args.dtype}, same loop): {rows[0]['matmul_gflops']:.0f} GFLOP/s")
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.processor()}
    print(json.dumps({"benchmark": "train_throughput", **meta, **vars(args), "rows": rows}))


if __name__ == "__main__":
    main()
