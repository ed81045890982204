"""The page in headless Chromium (onnxruntime-web, WebAssembly) beside the native ONNX engine, on the same folder.

    python benchmarks/web_speed.py --presets tiny,xs --variants moe-mla-rope,mha

For each preset and variant: random weights (speed does not depend on training) with a BPE of 4,096 tokens trained
on the built-in corpus (the page needs a tokenizer of the model's vocabulary, and no GPT-2 download here), written
as a web export folder with fp32 and int8 weights. The page runs `?prompt=...&greedy=1&max=N&threads=T` for 1 and
2 threads (moemla web's isolation headers make threads possible); the native engine (onnxruntime's CPU execution
provider, `OnnxDecoder`) decodes the same prompt ids with intra-op threads 1 and 2. Both measure time to first
token (prefill + the first sample) and decode tokens/s after it; no end of text stops a run. Best of `--repeats`.
Prints a Markdown table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PROMPT = "Once upon a time, there was a little girl named Lily. She loved to play in the park with her friends."


def tokenizer_file(root: Path) -> Path:
    """A 4,096-token BPE trained on the built-in corpus by `moemla prepare`."""
    data = root / "data"
    argv = [sys.executable, "-m", "moemla", "prepare", "--stories", "2000", "--vocab-size", "4096", "--out", str(data)]
    subprocess.run(argv, check=True, capture_output=True)
    return data / "tokenizer.json"


def write_folder(preset: str, variant: str, quantize: str, tokenizer: Path, out: Path) -> Path:
    import torch

    from moemla.config import ModelConfig
    from moemla.inference.onnx.write import write_onnx
    from moemla.model import Transformer
    from moemla.web.export import add_page

    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset(preset, variant, vocab_size=4096, dropout=0.0)).eval()
    write_onnx(model, out, quantize=quantize, tokenizer=tokenizer, eos_token_id=None)  # no eos: every run is N long
    add_page(out)
    return out


def native(folder: Path, prompt_ids: list[int], new: int, threads: int, repeats: int) -> dict:
    from moemla.config import ModelConfig
    from moemla.inference.onnx.engine import OnnxSession, read_manifest

    manifest = read_manifest(folder)
    session = OnnxSession(folder / "model.onnx", ModelConfig.from_dict(manifest["config"]), manifest["cache"], threads)
    best: dict = {}
    for _ in range(repeats):
        start = time.perf_counter()
        token = int(np.argmax(session.prefill([prompt_ids])[0]))
        first = time.perf_counter()
        for _ in range(new - 1):
            token = int(np.argmax(session.step([token])[0]))
        end = time.perf_counter()
        run = {"ttft_ms": (first - start) * 1000, "decode_tokens_per_s": (new - 1) / (end - first)}
        if not best or run["decode_tokens_per_s"] > best["decode_tokens_per_s"]:
            best = run
        session.reset()
    return best


def in_browser(chromium: object, url: str, new: int, threads: int, repeats: int) -> dict:
    best: dict = {}
    for _ in range(repeats):
        run = chromium.open(f"{url}?prompt={PROMPT.replace(' ', '%20')}&greedy=1&max={new}&threads={threads}")
        if run.state != "done":
            raise SystemExit(f"the page failed: {run.status}")
        if not best or run.result["decode_tokens_per_s"] > best["decode_tokens_per_s"]:
            keys = ("ttft_ms", "decode_tokens_per_s", "threads", "decode_ms", "decode_ms_in_onnxruntime")
            best = {k: run.result[k] for k in keys}
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="tiny,xs")
    p.add_argument("--variants", default="moe-mla-rope,mha")
    p.add_argument("--quantize", default="none,int8")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()

    from tokenizers import Tokenizer

    from moemla.web.browser import browser, serving, why_no_browser

    if why_no_browser():
        raise SystemExit(why_no_browser())
    rows = []
    with tempfile.TemporaryDirectory() as tmp, browser() as chromium:
        tok = tokenizer_file(Path(tmp))
        prompt_ids = Tokenizer.from_file(str(tok)).encode(PROMPT).ids
        cases = [(p, v, q) for p in args.presets.split(",") for v in args.variants.split(",")
                 for q in args.quantize.split(",")]  # fmt: skip
        for preset, variant, quantize in cases:
            folder = write_folder(preset, variant, quantize, tok, Path(tmp) / f"{preset}-{variant}-{quantize}")
            size = (folder / "model.onnx").stat().st_size / 2**20
            with serving(str(folder)) as url:
                for threads in map(int, args.threads.split(",")):
                    web = in_browser(chromium, url, args.new_tokens, threads, args.repeats)
                    ort = native(folder, prompt_ids, args.new_tokens, threads, args.repeats)
                    weights = quantize.replace("none", "fp32")
                    rows.append(
                        {
                            "preset": preset,
                            "variant": variant,
                            "weights": weights,
                            "threads": threads,
                            "model_mib": round(size, 1),
                            "web": web,
                            "native": ort,
                        }
                    )
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    from moemla.device import cpu_name

    print(f"CPU: {cpu_name()}; prompt {len(prompt_ids)} tokens, {args.new_tokens} new tokens, best of {args.repeats}\n")
    print("| preset | variant | weights | threads | model MiB | browser decode tok/s | native decode tok/s | "
          "browser / native | in onnxruntime-web | browser TTFT ms | native TTFT ms |")  # fmt: skip
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        w, n = r["web"], r["native"]
        ratio = w["decode_tokens_per_s"] / n["decode_tokens_per_s"]
        inside = w["decode_ms_in_onnxruntime"] / w["decode_ms"]
        print(f"| {r['preset']} | {r['variant']} | {r['weights']} | {r['threads']} | {r['model_mib']} | "
              f"{w['decode_tokens_per_s']:,.1f} | {n['decode_tokens_per_s']:,.1f} | {ratio:.2f}x | {inside:.0%} | "
              f"{w['ttft_ms']:,.1f} | {n['ttft_ms']:,.1f} |")  # fmt: skip
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
