"""Write a story with a moemla ONNX export: needs only numpy, onnxruntime and tokenizers (no torch, no moemla).

    pip install numpy onnxruntime tokenizers
    python run_onnx.py "Once upon a time" --max-new-tokens 100

Written by `moemla export RUN OUT --format onnx`. The graph takes token ids, an attention mask and the past
cache (names and shapes in manifest.json) and returns logits and the cache grown by the new tokens; MLA layers
cache only their latents. The sampling defaults are moemla's (manifest.json, "sampling").
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

HERE = Path(__file__).resolve().parent


def sample(logits, temperature, top_k, top_p, rng):
    """One token id from logits (V,): greedy at temperature 0, else within the top-k and the top-p nucleus."""
    if temperature == 0:
        return int(logits.argmax())
    order = np.argsort(-logits, kind="stable")[: top_k or None]
    probs = np.exp((logits[order] - logits[order[0]]) / temperature)
    probs /= probs.sum()
    if top_p is not None and top_p < 1:
        probs = np.where(np.cumsum(probs) - probs < top_p, probs, 0.0)
        probs /= probs.sum()
    return int(order[rng.choice(len(order), p=probs)])


def truncate_prompt(ids, context, max_new):
    """moemla's one rule (inference/sampling.py, held equal by a test): the prompt's end, cut so that
    min(max_new, context // 2) tokens may follow."""
    keep = context - min(max_new, context // 2)
    return list(ids[-keep:]) if len(ids) > keep else list(ids)


def load():
    """The manifest, tokenizer and session of this folder; one line naming what is damaged otherwise."""
    again = "export the model again with `moemla export RUN OUT --format onnx`"
    try:
        manifest = json.loads((HERE / "manifest.json").read_text())
    except FileNotFoundError:
        sys.exit(f"{HERE / 'manifest.json'} is missing; {again}")
    except ValueError as err:
        sys.exit(f"{HERE / 'manifest.json'} is not valid JSON ({err}); {again}")
    for key in ("sampling", "config", "cache", "eos_token_id"):
        if not isinstance(manifest, dict) or key not in manifest:
            sys.exit(f"{HERE / 'manifest.json'} has no {key!r}; {again}")
    if not isinstance(manifest["config"].get("max_seq_len"), int):
        sys.exit(f"{HERE / 'manifest.json'} has no 'config.max_seq_len'; {again}")
    for name in ("tokenizer.json", "model.onnx"):
        if not (HERE / name).is_file():
            sys.exit(f"{HERE / name} is missing; {again}")
    try:
        tokenizer = Tokenizer.from_file(str(HERE / "tokenizer.json"))
    except Exception as err:  # tokenizers raises its own exception type
        sys.exit(f"{HERE / 'tokenizer.json'} cannot be read ({str(err).splitlines()[0]}); {again}")
    try:
        session = ort.InferenceSession(str(HERE / "model.onnx"), providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types
        sys.exit(f"{HERE / 'model.onnx'} cannot be loaded ({str(err).splitlines()[0][:200]}); {again}")
    return manifest, tokenizer, session


def main():
    manifest, tokenizer, session = load()
    defaults = manifest["sampling"]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("prompt", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=defaults["max_new_tokens"])
    p.add_argument("--temperature", type=float, default=defaults["temperature"], help="0 is greedy")
    p.add_argument("--top-k", type=int, default=defaults["top_k"])
    p.add_argument("--top-p", type=float, default=defaults["top_p"])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.max_new_tokens < 0:
        p.error(f"--max-new-tokens must be at least 0, got {args.max_new_tokens}")
    if args.temperature < 0:
        p.error(f"--temperature must be at least 0, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        p.error(f"--top-k must be at least 1, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        p.error(f"--top-p must be in (0, 1], got {args.top_p}")

    context, eos = manifest["config"]["max_seq_len"], manifest["eos_token_id"]
    encoded = tokenizer.encode(args.prompt).ids
    if not encoded:
        sys.exit("the prompt is empty")
    ids = truncate_prompt(encoded, context, args.max_new_tokens)
    if len(ids) < len(encoded):
        room = context - len(ids)
        print(
            f"run_onnx.py: the prompt's {len(encoded)} tokens were cut to its last {len(ids)} (the context is "
            f"{context}), so up to {min(room, args.max_new_tokens)} new tokens fit",
            file=sys.stderr,
        )
    elif len(ids) + args.max_new_tokens > context:
        print(
            f"run_onnx.py: only {context - len(ids)} of the {args.max_new_tokens} new tokens fit in the context "
            f"of {context}",
            file=sys.stderr,
        )
    rng = np.random.default_rng(args.seed)
    cache = {c["past"]: np.zeros([{"batch": 1, "past": 0}.get(n, n) for n in c["shape"]], np.float32)
             for c in manifest["cache"]}  # fmt: skip
    feed_ids, new = np.array([ids], np.int64), []
    print(args.prompt, end="", flush=True)
    shown = ""
    while len(new) < args.max_new_tokens and len(ids) + len(new) < context:
        mask = np.ones((1, len(ids) + len(new)), np.int64)
        last = np.array([[feed_ids.shape[1] - 1]], np.int64)  # logits of the last new position only
        feed = {"input_ids": feed_ids, "attention_mask": mask, "logits_at": last, **cache}
        logits, *present = session.run(None, feed)
        cache = {c["past"]: a for c, a in zip(manifest["cache"], present, strict=True)}
        token = sample(logits[0, -1], args.temperature, args.top_k, args.top_p, rng)
        if token == eos:
            break
        new.append(token)
        text = tokenizer.decode(new)
        if not text.endswith("\ufffd"):  # a multi-byte character is printed once it is whole
            print(text[len(shown) :], end="", flush=True)
            shown = text
        feed_ids = np.array([[token]], np.int64)
    print(tokenizer.decode(new)[len(shown) :])


if __name__ == "__main__":
    main()
