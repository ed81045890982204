"""vLLM on a DeepSeek-flavored moemla export (issue 43, item 3): does `vllm` load the native deepseek_v3 folder and
write moemla's greedy tokens, and how large is its KV cache per token? Needs a GPU and vllm (not on the project's
CPU machines: no CPU wheel on PyPI), so it is one of benchmarks/gpu_pending.sh's measurements.

    python benchmarks/vllm_greedy.py --device cuda --preset tiny --new 32

Builds a seeded random model (no training: greedy tokens depend only on the weights), exports it with moemla's own
`export_hf` into a temporary folder, then decodes the same prompts with moemla (torch, fp32) and with vLLM (fp32,
eager) and prints one JSON line: equal greedy tokens per prompt, and what vLLM reports of its cache.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from moemla import ModelConfig, Transformer
from moemla.data.tokenizer import train_bpe
from moemla.export.hf import write_hf_folder
from moemla.inference.generate import generate_ids
from moemla.inference.sampling import greedy

PROMPTS = ["Once upon a time", "The little fox", "Tom and Sue went to the park"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", help="size preset of the random model (default tiny)")
    p.add_argument("--new", type=int, default=32, help="greedy tokens per prompt (default 32)")
    p.add_argument("--device", default="cuda", help="where moemla's reference decodes (default cuda, as vLLM)")
    args = p.parse_args()
    try:
        from vllm import LLM, SamplingParams
    except ImportError:
        print(json.dumps({"skipped": "vllm is not installed here"}))
        return 0
    tok = train_bpe(iter(["Once upon a time the little fox and Tom and Sue went to the park."] * 200), 300)
    torch.manual_seed(0)
    vocab = tok.get_vocab_size()
    cfg = ModelConfig.from_preset(args.preset, "moe-mla-drope", "deepseek", vocab_size=vocab, dropout=0.0)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for w in model.parameters():
            w.add_(0.05 * torch.randn_like(w))
    with tempfile.TemporaryDirectory() as tmp:
        tok_file = Path(tmp) / "tokenizer.json"
        tok.save(str(tok_file))
        folder = Path(tmp) / "hf"
        write_hf_folder(model, tok, "deepseek_v3", "float32", tok_file, folder)
        reference = model.to(args.device)
        want = [generate_ids(reference, tok.encode(t).ids, greedy(args.new)) for t in PROMPTS]
        llm = LLM(model=str(folder), dtype="float32", enforce_eager=True, max_model_len=cfg.max_seq_len)
        outs = llm.generate([{"prompt_token_ids": tok.encode(t).ids} for t in PROMPTS],
                            SamplingParams(temperature=0, max_tokens=args.new, ignore_eos=True))  # fmt: skip
        got = [list(o.outputs[0].token_ids) for o in outs]
    print(json.dumps({"preset": args.preset, "equal": [g == w for g, w in zip(got, want, strict=True)],
                      "moemla_kv_bytes_per_token": 4 * cfg.n_layers * (cfg.kv_lora_rank + cfg.rope_dim)}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
