"""The ONNX engine beside torch eager and the numba CPU engine (fp32, int8), each in its own process.

    python benchmarks/onnx_engines.py --presets tiny,xs --variants mha,moe-mla-drope,moe-mla-rope --batches 1,16

Random weights (speed does not depend on training), `moemla bench`'s loop: prefill context - new tokens, then
new-tokens decode steps, best of two runs. Each row runs `moemla bench --json` in a fresh process, so its peak
resident memory (the process's max RSS, from wait4) belongs to that engine alone; the ONNX rows export the model
first (in the same process; the export's time is not in the timings) and report the file size. Prints a
Markdown table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile

ENGINES = [("torch", "none"), ("numba", "none"), ("numba", "int8"), ("onnx", "none"), ("onnx", "int8"),
           ("onnx", "int4")]  # fmt: skip


def run(preset: str, variant: str, engine: str, quantize: str, batch: int, context: int, new: int) -> dict | None:
    argv = [sys.executable, "-m", "moemla", "bench", "--preset", preset, "--variants", variant, "--engine", engine,
            "--quantize", quantize, "--batch", str(batch), "--context", str(context), "--new-tokens", str(new),
            "--json", "--device", "cpu"]  # fmt: skip
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS
        out.seek(0), err.seek(0)
        if os.waitstatus_to_exitcode(status) != 0:
            last = (err.read().strip().splitlines() or ["?"])[-1]
            print(f"{preset} {variant} {engine} {quantize} batch {batch}: {last}", file=sys.stderr)
            return None
        row = json.loads(out.read())[0]
    row["preset"] = preset
    row["max_rss_bytes"] = usage.ru_maxrss * 1024  # KiB on Linux
    return row


def peak_rss(argv_row: dict) -> float:
    return (argv_row.get("max_rss_bytes") or 0) / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="tiny,xs")
    p.add_argument("--variants", default="mha,moe-mla-drope,moe-mla-rope")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--new-tokens", type=int, default=64)
    args = p.parse_args()
    from moemla.config import ModelConfig

    rows = []
    for preset in args.presets.split(","):
        context = ModelConfig.from_preset(preset).max_seq_len  # the longest context: the cache moved in and out
        for variant in args.variants.split(","):
            for batch in (int(b) for b in args.batches.split(",")):
                for engine, quantize in ENGINES:
                    if batch > 1 and engine == "numba":
                        continue  # one sequence at a time
                    r = run(preset, variant, engine, quantize, batch, context, args.new_tokens)
                    if r:
                        rows.append(r)
                        print(f"{preset} {variant} b{batch} {engine} {quantize}: decode "
                              f"{r['decode_tokens_per_s']:.1f} tok/s", file=sys.stderr, flush=True)  # fmt: skip
    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print(
        "| preset | variant | batch | engine | weights | prefill tok/s | decode tok/s | TTFT ms | peak RSS MiB | "
        "weights MiB |"
    )
    print("|---|---|---:|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['preset']} | {r['variant']} | {r['batch']} | {r['engine']} | "
              f"{'fp32' if r['quantize'] == 'none' else r['quantize']} | {r['prefill_tokens_per_s']:,.0f} | "
              f"{r['decode_tokens_per_s']:,.1f} | {r['ttft_ms']:.1f} | {peak_rss(r):,.0f} | "
              f"{r['weight_bytes'] / 2**20:,.1f} |")  # fmt: skip
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
