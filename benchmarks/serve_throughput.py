"""moemla serve under load: generated tokens/s for N concurrent clients against the same requests sent one by one.

    python benchmarks/serve_throughput.py --preset tiny --variant moe-mla-rope --clients 1,4,16 --tokens 64

A random-weight model (speed does not depend on training) behind the real HTTP server on loopback; every
request asks for exactly --tokens tokens (no end-of-text stop) with its own seed. Prints a table, then JSON.
"""

from __future__ import annotations

import argparse
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import torch
import uvicorn

from moemla.config import ModelConfig
from moemla.data.tokenizer import train_bpe
from moemla.model import Transformer
from moemla.serve.app import create_app
from moemla.serve.engine import Engine


def start(model: Transformer, tok, max_batch: int) -> tuple[str, uvicorn.Server, Engine]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    engine = Engine(model, stop=None, max_batch=max_batch)  # no stop token: every request runs its full budget
    server = uvicorn.Server(uvicorn.Config(create_app(engine, tok, "bench"), port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    return f"http://127.0.0.1:{port}", server, engine


def load(url: str, clients: int, requests: int, tokens: int, prompt: list[int]) -> dict[str, float]:
    def one(i: int) -> int:
        body = {"model": "bench", "prompt": prompt, "max_tokens": tokens, "temperature": 0.8, "seed": i}
        r = httpx.post(url + "/v1/completions", json=body, timeout=600)
        r.raise_for_status()
        return r.json()["usage"]["completion_tokens"]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        made = sum(pool.map(one, range(requests)))
    wall = time.perf_counter() - t0
    return {"clients": clients, "requests": requests, "tokens": made, "seconds": wall, "tok_s": made / wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--variant", default="moe-mla-rope")
    ap.add_argument("--clients", default="1,4,16", help="concurrent clients, comma-separated")
    ap.add_argument("--requests", type=int, default=32, help="requests per measurement")
    ap.add_argument("--tokens", type=int, default=64, help="tokens generated per request")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--vocab-size", type=int, help="the model's vocabulary (default the tokenizer's 300): 50257 "
                    "measures what a GPT-2-sized LM head and sampler cost per token")  # fmt: skip
    args = ap.parse_args()
    torch.manual_seed(0)
    tok = train_bpe(iter(["Once upon a time there was a little fox who liked to play."] * 50), 300)
    vocab = args.vocab_size or tok.get_vocab_size()  # ids past the tokenizer's decode to no text, which is fine here
    cfg = ModelConfig.from_preset(args.preset, args.variant, vocab_size=vocab, dropout=0.0)
    model = Transformer(cfg).to(args.device).eval()
    clients = [int(c) for c in args.clients.split(",")]
    url, server, engine = start(model, tok, max(clients))
    prompt = list(range(1, args.prompt_tokens + 1))
    load(url, 1, 2, 8, prompt)  # warm-up
    rows = []
    for c in clients:
        before = dict(engine.stats)
        row = load(url, c, args.requests, args.tokens, prompt)
        batches = max(1, engine.stats["batches"] - before["batches"])
        row["mean_batch"] = (engine.stats["jobs"] - before["jobs"]) / batches
        rows.append(row)
    base = rows[0]["tok_s"]
    print(f"{args.preset} {args.variant}, vocabulary {vocab}, {args.device}, {args.tokens} tokens per request, "
          f"{args.requests} requests")  # fmt: skip
    print(f"{'clients':>8} {'tok/s':>9} {'vs 1':>6} {'mean batch':>11}")
    for r in rows:
        print(f"{r['clients']:>8} {r['tok_s']:>9.1f} {r['tok_s'] / base:>5.2f}x {r['mean_batch']:>11.1f}")
    print(json.dumps(rows))
    server.should_exit = True
    engine.close()


if __name__ == "__main__":
    main()
