"""`moemla bench`: KV-cache bytes, prefill and decode speed, per-token latency and memory per variant.

Weights are random: speed and memory do not depend on training. Each variant prefills a prompt of
`context - new_tokens` tokens, then decodes `new_tokens` tokens one at a time into the same
preallocated cache, so the last step attends over `context` positions.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from moemla import accounting
from moemla.config import ConfigError, ModelConfig, variant_name
from moemla.inference.decoder import Decoder, EngineName, Quantize, make_decoder
from moemla.model import Transformer
from moemla.progress import Progress


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def bench(
    cfg: ModelConfig,
    batch: int,
    context: int,
    new_tokens: int,
    *,
    engine: EngineName = "torch",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    absorbed: bool = True,
    compile: bool = False,
    cuda_graph: bool = False,
    quantize: Quantize = "none",
    repeats: int = 2,
) -> dict[str, object]:
    """One row through the Decoder interface: the best of `repeats` runs (the first also warms up and compiles)."""
    _check_lengths(cfg, context, new_tokens)
    if engine == "llama.cpp":
        raise ConfigError(
            "the llama.cpp engine's bench is moemla.export.gguf_bench.bench_llamacpp (it exports to GGUF)"
        )
    device = torch.device(device)
    torch.manual_seed(0)
    model = Transformer(cfg.replace(dropout=0.0)).to(device=device, dtype=dtype)
    mode = "cuda-graph" if cuda_graph else "eager"
    dec = make_decoder(model, engine, batch_size=batch, quantize=quantize, absorbed=absorbed, mode=mode,
                       compile=compile)  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, cfg.vocab_size, (batch, context - new_tokens), generator=gen).tolist()
    steps = torch.randint(0, cfg.vocab_size, (new_tokens, batch), generator=gen).tolist()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    name = f"bench {variant_name(cfg) or 'custom'} batch {batch}"
    best = _best_run(dec, prompts, steps, context, device, repeats, name)
    cache_bytes, weight_bytes = dec.cache_nbytes, dec.weight_nbytes  # its real tensors, not a formula
    cuda = device.type == "cuda"
    cpu_engine = engine != "torch"
    return {
        "variant": variant_name(cfg) or "custom",
        "batch": batch,
        "context": context,
        "new_tokens": new_tokens,
        "device": str(device),
        "dtype": "float32" if cpu_engine else str(dtype).removeprefix("torch."),
        "engine": engine,
        "quantize": quantize,
        "decode_path": "absorbed" if (absorbed or cpu_engine) and cfg.attention == "mla" else "naive",
        "compiled": compile or engine in ("numba", "onnx"),
        "cuda_graph": cuda_graph,
        "kv_cache_bytes_per_token": cache_bytes // (batch * context),
        **best,  # type: ignore[dict-item]
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if cuda else weight_bytes + cache_bytes,
        "peak_memory_kind": "cuda max allocated" if cuda else "weights + cache",
        "weight_bytes": weight_bytes,  # the engine's own layout: an ONNX engine's file size
    }


def _best_run(
    dec: Decoder, prompts: list[list[int]], steps: list[list[int]], context: int, device: torch.device, repeats: int,
    name: str,
) -> dict[str, object]:  # fmt: skip
    """Prefill then decode `steps`, `repeats` + 1 times (the first also warms up); the fastest run's timings."""
    best: dict[str, object] | None = None
    with Progress(name, total=(repeats + 1) * len(steps), unit="decode steps") as bar:
        for _ in range(repeats + 1):
            _sync(device)
            t0 = time.perf_counter()
            dec.prefill(prompts, context)
            _sync(device)
            prefill = time.perf_counter() - t0
            latencies = []
            for tokens in steps:
                t0 = time.perf_counter()
                dec.step(tokens).argmax(-1)  # what a greedy sampler would do with the logits
                _sync(device)
                latencies.append(time.perf_counter() - t0)
                bar.advance()
            row = _timings(len(prompts), len(prompts[0]), prefill, latencies)
            if best is None or row["decode_tokens_per_s"] > best["decode_tokens_per_s"]:  # type: ignore[operator]
                best = row
    return best  # type: ignore[return-value]


def fit_batch(cfg: ModelConfig, context: int, dtype: str, budget_bytes: float) -> tuple[int, int, int]:
    """(largest batch, weight bytes, cache bytes per sequence) whose weights + KV cache fit the budget."""
    weights = accounting.total_params(cfg) * accounting.DTYPE_BYTES[dtype]
    per_sequence = context * accounting.kv_cache_bytes_per_token(cfg, dtype)
    return max(0, int((budget_bytes - weights) // per_sequence)), weights, per_sequence


def bench_memory(
    cfg: ModelConfig, context: int, new_tokens: int, budget_gib: float, *, cap: int | None = None, **kwargs: object
) -> dict[str, object]:
    """For a memory budget: the largest batch of `context`-token sequences that fits, and its decode speed there."""
    dtype = str(kwargs.get("dtype", torch.float32)).removeprefix("torch.")
    batch, weights, per_sequence = fit_batch(cfg, context, dtype, budget_gib * 2**30)
    info = {"memory_budget_gib": budget_gib, "fits_batch": batch, "weights_bytes": weights,
            "cache_bytes_per_sequence": per_sequence}  # fmt: skip
    if batch == 0:
        return {"variant": variant_name(cfg) or "custom", "batch": 0, "context": context, **info}
    run = min(batch, cap) if cap else batch
    return {**bench(cfg, run, context, new_tokens, **kwargs), **info}  # type: ignore[arg-type]


def _check_lengths(cfg: ModelConfig, context: int, new_tokens: int) -> None:
    if not 0 < new_tokens < context <= cfg.max_seq_len:
        raise ValueError(
            f"need 0 < new_tokens ({new_tokens}) < context ({context}) <= the model's max_seq_len ({cfg.max_seq_len})"
        )


def _timings(batch: int, prompt_len: int, prefill: float, latencies: list[float]) -> dict[str, float]:
    return {
        "prefill_tokens_per_s": batch * prompt_len / prefill,
        "ttft_ms": 1e3 * prefill,  # the first token is sampled from the prefill's logits
        "decode_tokens_per_s": batch * len(latencies) / sum(latencies),
        "latency_ms_p50": 1e3 * statistics.median(latencies),
        "latency_ms_p95": 1e3 * statistics.quantiles(latencies, n=20)[-1],
    }


def add_relative(rows: list[dict[str, object]]) -> None:
    """KV bytes and decode speed relative to the mha row of the same batch size."""
    for row in rows:
        base = next((r for r in rows if r["variant"] == "mha" and r["batch"] == row["batch"]), None)
        if base is not None:
            row["kv_vs_mha"] = row["kv_cache_bytes_per_token"] / base["kv_cache_bytes_per_token"]  # type: ignore[operator]
            row["decode_speedup_vs_mha"] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"]  # type: ignore[operator]


def print_table(rows: list[dict[str, object]], title: str) -> None:
    """The rows as a table for people (wide enough to read in pipes and CI logs too)."""
    import sys

    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for name in ("variant", "batch", "KV B/token", "KV vs mha", "prefill tok/s", "decode tok/s", "vs mha",
                 "p50 ms", "p95 ms", "memory"):  # fmt: skip
        table.add_column(name, justify="left" if name == "variant" else "right")
    for r in rows:
        rel = "kv_vs_mha" in r
        table.add_row(
            str(r["variant"]), str(r["batch"]), f"{r['kv_cache_bytes_per_token']:,}",
            f"{r['kv_vs_mha']:.0%}" if rel else "-",
            f"{r['prefill_tokens_per_s']:,.0f}", f"{r['decode_tokens_per_s']:,.1f}",
            f"{r['decode_speedup_vs_mha']:.2f}x" if rel else "-",
            _ms(r["latency_ms_p50"]), _ms(r["latency_ms_p95"]),
            f"{r['peak_memory_bytes'] / 2**20:,.0f} MiB",
        )  # fmt: skip
    Console(width=None if sys.stdout.isatty() else 130).print(table)


def _ms(value: object) -> str:
    return "-" if value is None else f"{value:.2f}"  # llama.cpp's loop reports no per-step latency


def print_memory_table(rows: list[dict[str, object]], title: str) -> None:
    """bench --memory rows: what fits the budget, and how fast it decodes there."""
    import sys

    from rich.console import Console
    from rich.table import Table

    base = next((r for r in rows if r["variant"] == "mha" and r["batch"]), None)
    table = Table(title=title)
    for name in ("variant", "KV MiB/sequence", "weights MiB", "fits batch", "measured batch", "decode tok/s",
                 "vs mha", "memory"):  # fmt: skip
        table.add_column(name, justify="left" if name == "variant" else "right")
    for r in rows:
        measured = bool(r["batch"])
        speed = f"{r['decode_tokens_per_s']:,.0f}" if measured else "does not fit"
        rel = f"{r['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}x" if measured and base else "-"
        table.add_row(
            str(r["variant"]), f"{r['cache_bytes_per_sequence'] / 2**20:,.2f}", f"{r['weights_bytes'] / 2**20:,.0f}",
            f"{r['fits_batch']:,}", str(r["batch"]), speed, rel,
            f"{r['peak_memory_bytes'] / 2**20:,.0f} MiB" if measured else "-",
        )  # fmt: skip
    Console(width=None if sys.stdout.isatty() else 130).print(table)


def plot(rows: list[dict[str, object]], path: str | Path) -> Path:
    from moemla.plots import plt

    batches = sorted({r["batch"] for r in rows})  # type: ignore[type-var]
    fig, axes = plt.subplots(1, 1 + len(batches), figsize=(4.5 * (1 + len(batches)), 4))
    first = [r for r in rows if r["batch"] == batches[0]]
    axes[0].barh([str(r["variant"]) for r in first], [r["kv_cache_bytes_per_token"] for r in first])
    axes[0].set_xlabel("KV-cache bytes per token")
    for ax, b in zip(axes[1:], batches, strict=True):
        sel = [r for r in rows if r["batch"] == b]
        ax.barh([str(r["variant"]) for r in sel], [r["decode_tokens_per_s"] for r in sel], color="tab:orange")
        ax.set_xlabel(f"decode tokens/s, batch {b}")
        ax.set_yticklabels([])
    fig.suptitle(f"{rows[0]['device']}, {rows[0]['dtype']}, context {rows[0]['context']}, random weights")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
