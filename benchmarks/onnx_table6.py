"""The paper's Table 6 (memory of parameters, KV cache and activations at batch 16) measured in an ONNX Runtime process.

    python benchmarks/onnx_table6.py --preset xs --batch 16 --context 512

For mha, mla-rope, moe-mha and moe-mla-rope: export the preset's random-weight model (fp32), then in a fresh process
that imports onnxruntime and numpy only, measure resident memory (RSS) after the imports, after the session loads
(parameters, as onnxruntime holds them), and its peak (VmHWM) over a prefill of `batch` x (context - 64) tokens
and 64 decode steps (a quarter of the context where that is shorter). The KV cache is the bytes of the cache
tensors at the end (exact); activations are what the peak adds beyond parameters and cache (transient buffers,
the cache copied into the next step's cache among them).
Prints a Markdown table beside the paper's proportions, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

PAPER = {"mha": 0.0, "mla-rope": -0.30, "moe-mha": 1.11, "moe-mla-rope": 0.81}  # Table 6, "vs. MHA"

CHILD = r"""
import json, sys
import numpy as np
import onnxruntime  # noqa: F401
from moemla.inference.onnx.engine import OnnxDecoder
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
folder, batch, context = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
assert "torch" not in sys.modules
base = rss()
dec = OnnxDecoder(folder)
loaded = rss()
rng = np.random.default_rng(0)
steps = min(64, context // 4)
prompts = rng.integers(0, dec.cfg.vocab_size, (batch, context - steps)).tolist()
dec.session.prefill(prompts)
for _ in range(steps):
    dec.session.step(rng.integers(0, dec.cfg.vocab_size, batch).tolist())
with open("/proc/self/status") as f:  # VmHWM: this program's peak (ru_maxrss would keep the parent's from before exec)
    peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
print(json.dumps({"base": base, "loaded": loaded, "peak": peak, "cache": dec.cache_nbytes,
                  "files": dec.weight_nbytes, "length": dec.length}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="xs")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--context", type=int, default=512)
    args = p.parse_args()
    import torch

    from moemla.config import ModelConfig
    from moemla.inference.onnx.write import write_onnx
    from moemla.model import Transformer

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in PAPER:
            torch.manual_seed(0)
            model = Transformer(ModelConfig.from_preset(args.preset, variant, dropout=0.0)).eval()
            folder = Path(tmp) / variant
            write_onnx(model, folder)
            del model
            child = [sys.executable, "-c", CHILD, str(folder), str(args.batch), str(args.context)]
            m = json.loads(subprocess.run(child, capture_output=True, text=True, check=True).stdout)
            params, cache = m["loaded"] - m["base"], m["cache"]
            rows.append({"variant": variant, "parameters": params, "kv_cache": cache,
                         "activations": m["peak"] - m["loaded"] - cache, "total": m["peak"] - m["base"],
                         "file_bytes": m["files"]})  # fmt: skip
            print(f"{variant}: done", file=sys.stderr, flush=True)
    mha = rows[0]["total"]
    mib = 2**20
    print(f"{args.preset}, batch {args.batch}, context {args.context}, fp32, ONNX Runtime (CPU); MiB")
    print("| | " + " | ".join(r["variant"] for r in rows) + " |")
    print("|---|" + "---:|" * len(rows))
    for key in ("parameters", "kv_cache", "activations", "total"):
        print(f"| {key} | " + " | ".join(f"{r[key] / mib:,.0f}" for r in rows) + " |")
    print("| vs. MHA (measured) | " + " | ".join(f"{r['total'] / mha - 1:+.0%}" for r in rows) + " |")
    print("| vs. MHA (paper, Table 6) | " + " | ".join(f"{PAPER[r['variant']]:+.0%}" for r in rows) + " |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
