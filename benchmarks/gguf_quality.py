"""What llama.cpp's weight types cost a trained DeepSeek-flavored run: validation perplexity and top-1 agreement.

    python benchmarks/gguf_quality.py RUN [--checkpoint step_N] [--max-tokens 8192] [--windows 4]

Each type (f32, f16, q8_0, q4_0) is exported with `moemla export --format gguf` and run by llama.cpp (its default f16
cache) through moemla's llama.cpp engine: perplexity on the run's validation split (`moemla eval`'s windows, the
run's own fp32 torch model scored on the same windows), and top-1 agreement, the share of positions of the first
`--windows` validation windows where llama.cpp's most likely next token is the torch model's.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

TYPES = ("f32", "f16", "q8_0", "q4_0")


def agreement(folder: Path, model: torch.nn.Module, windows: list[list[int]]) -> float:
    from moemla.inference.llamacpp.engine import LlamaCppDecoder

    dec = LlamaCppDecoder(folder)
    same = total = 0
    try:
        for ids in windows:
            theirs = dec.logits(ids).argmax(-1)
            with torch.no_grad():
                ours = model(torch.tensor([ids]))[0][0].argmax(-1)
            same += int((theirs == ours).sum())
            total += len(ids)
    finally:
        dec.close()
    return same / total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run")
    p.add_argument("--checkpoint")
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--windows", type=int, default=4)
    args = p.parse_args()
    from moemla.data.shards import PreparedData
    from moemla.eval.folder_eval import evaluate_run
    from moemla.export.gguf import export_gguf
    from moemla.runs import RunFolder

    run = RunFolder.open(args.run)
    model = run.load_model("cpu", args.checkpoint)
    seq = min(run.train_settings.get("seq_len", model.cfg.max_seq_len), model.cfg.max_seq_len - 1)
    val = PreparedData.open(run.data_path).shards("val")[0]
    windows = [val[i * seq : (i + 1) * seq].tolist() for i in range(args.windows)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="moemla-gguf-q-") as tmp:
        for qtype in TYPES:
            out = Path(tmp) / qtype
            export_gguf(args.run, out, qtype=qtype, checkpoint=args.checkpoint)
            r = evaluate_run(out, max_tokens=args.max_tokens)
            rows.append({"type": qtype, "file_mib": (out / "model.gguf").stat().st_size / 2**20,
                         "val_ppl": r["val_ppl"], "fp32_val_ppl": r["fp32"]["val_ppl"], "vs_fp32": r["ppl_vs_fp32"],
                         "tokens": r["tokens"], "agreement": agreement(out, model, windows)})  # fmt: skip
            print(f"{qtype}: ppl {r['val_ppl']:.3f} ({r['ppl_vs_fp32']:+.2%})", file=sys.stderr, flush=True)
    print(f"run {args.run} ({args.checkpoint or 'newest checkpoint'}); {rows[0]['tokens']:,} validation tokens; "
          f"agreement over {args.windows} windows of {seq}")  # fmt: skip
    print("| weights | file MiB | validation perplexity | vs the run's fp32 (torch) | top-1 agreement |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['type']} | {r['file_mib']:.1f} | {r['val_ppl']:.3f} | {r['vs_fp32']:+.2%} | "
              f"{r['agreement']:.2%} |")  # fmt: skip
    print(f"torch fp32 perplexity on the same windows: {rows[0]['fp32_val_ppl']:.3f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
