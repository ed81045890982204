"""llama.cpp in a process of its own, answering moemla's requests (one JSON line in, one answer out).

Run by inference/llamacpp/engine.py as `python -m moemla.inference.llamacpp.worker SETTINGS`; imports only the
standard library, numpy and the xllamacpp binding. Why a process: the binding runs one server loop per process
(a second server in one process hung in our tests), a crash or a hang in native code must not take moemla's
process with it, and the parent can time a request out.

The binding speaks llama.cpp's completion API, not raw logits, so each answer is read off that API:

- `next`: the log-probabilities of every vocabulary entry after each row (B, V). One request with the rows as
  prompts, one token each, `n_probs` = V: llama.cpp reports the full distribution of the model's own logits
  (before any sampler). The sampled token itself is forced by a logit bias onto a token whose text is one whole
  character, because llama.cpp reports nothing for a token that ends inside a UTF-8 character. The slots keep each
  row's cache, so a row grown by one token costs one token of compute.
- `score`: the log-probability of each token of a sequence given those before it (T - 1,), as perplexity needs.
  Each position asks for one token with that token forced and `n_probs` = 1 (a small answer); a token llama.cpp
  does not report (part of a character) is read off a `next` answer instead.
- `generate`: llama.cpp's own greedy loop over the prompts (its sampler, its timings): what `moemla bench` times.

Answers: one JSON line (`{"shape": [...]}` followed by that many float32 values as bytes, or `{"json": ...}`, or
`{"error": "..."}`).
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

FORCE = 1e9  # a logit bias that makes the sampler pick the token it is given


def open_server(settings: dict) -> object:
    """The llama.cpp server for the file: `slots` rows at a time, `ctx` tokens each, `threads` CPU threads; `exact`:
    an f32 cache and no flash attention (its CPU kernels round through fp16), else llama.cpp's defaults."""
    import xllamacpp as xlc

    p = xlc.CommonParams()
    p.model.path = settings["path"]
    p.n_parallel, p.n_ctx, p.verbosity = settings["slots"], settings["slots"] * settings["ctx"], settings["verbosity"]
    p.cpuparams.n_threads = p.cpuparams_batch.n_threads = settings["threads"]
    if settings["exact"]:
        p.cache_type_k = p.cache_type_v = xlc.ggml_type.GGML_TYPE_F32
        p.flash_attn_type = xlc.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_DISABLED
    return xlc.Server(p)


def complete(server: object, ask: dict) -> dict:
    answer = server.handle_completions(ask)
    if "error" in answer:
        raise RuntimeError(answer["error"].get("message", str(answer["error"])))
    return answer


def next_logprobs(server: object, rows: list[list[int]], vocab: int, whole: int) -> np.ndarray:
    """(B, V) float32: every entry's log-probability after each row."""
    ask = {"prompt": rows, "n_predict": 1, "temperature": 0, "n_probs": vocab, "post_sampling_probs": False,
           "logit_bias": [[whole, FORCE]], "cache_prompt": True}  # fmt: skip
    out = np.full((len(rows), vocab), -np.inf, dtype=np.float32)
    for choice in complete(server, ask)["choices"]:
        entry = (choice.get("logprobs") or {}).get("content") or []
        if not entry:
            raise RuntimeError("llama.cpp reported no log-probabilities for a row")
        top = entry[0]["top_logprobs"]
        out[choice["index"], [t["id"] for t in top]] = [t["logprob"] for t in top]
    return out


def score(server: object, ids: list[int], vocab: int, whole: int) -> np.ndarray:
    """(T - 1,) float32: log p(ids[t] | ids[:t]) for t = 1 .. T - 1."""
    out = np.empty(len(ids) - 1, dtype=np.float32)
    for t in range(1, len(ids)):
        ask = {"prompt": ids[:t], "n_predict": 1, "temperature": 0, "n_probs": 1, "post_sampling_probs": False,
               "logit_bias": [[ids[t], FORCE]], "cache_prompt": True}  # fmt: skip
        entry = (complete(server, ask)["choices"][0].get("logprobs") or {}).get("content") or []
        if entry and entry[0]["id"] == ids[t]:
            out[t - 1] = entry[0]["logprob"]
        else:  # part of a UTF-8 character (or an end-of-text token), which llama.cpp does not report alone
            out[t - 1] = next_logprobs(server, [ids[:t]], vocab, whole)[0, ids[t]]
    return out


def generate(server: object, prompts: list[list[int]], n: int) -> dict:
    """llama.cpp's greedy loop: n tokens after each prompt (end of text ignored), wall time and its own timings."""
    ask = {"prompt": prompts, "n_predict": n, "temperature": 0, "ignore_eos": True, "cache_prompt": False}
    t0 = time.perf_counter()
    answer = complete(server, ask)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "timings": answer.get("timings"), "usage": answer.get("usage")}


def main() -> int:
    channel = os.fdopen(os.dup(1), "wb")  # the answers' own channel ...
    os.dup2(2, 1)  # ... so that whatever the native code prints goes to stderr

    def send(header: dict, payload: np.ndarray | None = None) -> None:
        channel.write((json.dumps(header) + "\n").encode())
        if payload is not None:
            channel.write(np.ascontiguousarray(payload, dtype=np.float32).tobytes())
        channel.flush()

    settings = json.loads(sys.argv[1])
    try:
        server = open_server(settings)
    except ImportError:
        send({"error": "no-binding"})
        return 1
    except Exception as err:  # the binding raises RuntimeError for a file llama.cpp cannot load
        send({"error": str(err).splitlines()[0] if str(err) else type(err).__name__})
        return 1
    send({"json": "ready"})
    vocab, whole = settings["vocab"], settings["whole"]
    for line in sys.stdin:
        ask = json.loads(line)
        try:
            if ask["op"] == "next":
                values = next_logprobs(server, ask["rows"], vocab, whole)
            elif ask["op"] == "score":
                values = score(server, ask["ids"], vocab, whole)
            else:
                send({"json": generate(server, ask["prompts"], ask["n"])})
                continue
        except Exception as err:
            send({"error": str(err).splitlines()[0] if str(err) else type(err).__name__})
            continue
        send({"shape": list(values.shape)}, values)
    return 0


if __name__ == "__main__":
    sys.exit(main())
