"""Decode a GGUF export folder with llama.cpp: the Decoder interface over the xllamacpp binding.

llama.cpp computes the model (its kernels, its quantized weights, its latent cache); moemla keeps the one decode
loop (inference/decode.py: sampling, the token budget, the fit check), as with the ONNX engine. The binding runs
in a worker process (worker.py says why and how each answer is read off llama.cpp's completion API). Each step
carries the whole vocabulary's log-probabilities back through that API, about 20 ms per row at a 4k vocabulary:
right for `moemla generate` and `moemla eval`, not a speed measure. `moemla bench --engine llama.cpp` times
llama.cpp's own decode loop instead (inference/bench.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from moemla.config import ConfigError, ModelConfig
from moemla.folders import (
    GGUF_FILE,
    GGUF_FORMAT,
    GGUF_KEYS,
    MANIFEST,
    RecordError,
    check_listed_files,
    kind,
    read_json,
    read_record,
)

if TYPE_CHECKING:
    import torch

EXTRA = "pip install 'moemla[gguf]' (gguf, xllamacpp)"
READ_VERSIONS = (2,)  # manifests this engine reads: 2 has tokenizer.json beside the file
TIMEOUT_S = 600  # the longest one request may take (a long `generate` in bench) before the worker is stopped


class LlamaCppError(ValueError):
    """llama.cpp refused a request or stopped: one line for the user (a ValueError, as the CLI prints those)."""


def is_gguf_folder(path: str | Path) -> bool:
    """Whether path is a GGUF export folder (its manifest says so), or a .gguf file inside one."""
    path = Path(path)
    if path.suffix != ".gguf":
        return kind(path) == "gguf"
    # a file: inside an export, or bare (no manifest beside it), for read_gguf_manifest to say what to do
    return kind(path.parent) == "gguf" or read_json(path.parent / MANIFEST) is None


def read_gguf_manifest(path: str | Path) -> tuple[Path, dict]:
    """(the folder, its checked manifest) for a GGUF export folder or the model.gguf inside one: every listed file
    present at its recorded size, so a truncated or swapped file is named before llama.cpp reads it."""
    path = Path(path)
    folder = path.parent if path.suffix == ".gguf" else path
    again = "export the run again with `moemla export RUN OUT --format gguf`"
    if not (folder / MANIFEST).is_file():
        raise ConfigError(
            f"{path}: moemla runs a GGUF file from the folder `moemla export --format gguf` "
            "wrote (model.gguf, tokenizer.json, manifest.json); run a foreign file with llama-cli"
        )
    try:
        manifest = read_record(folder / MANIFEST, GGUF_KEYS, again)
        if manifest["format"] != GGUF_FORMAT:
            raise RecordError(f"{folder / MANIFEST} is not a GGUF export's manifest; {again}")
        if manifest["version"] not in READ_VERSIONS:
            raise RecordError(f"{folder} was written by another moemla (GGUF folder version {manifest['version']}, "
                              f"this one reads {', '.join(map(str, READ_VERSIONS))}); {again}")  # fmt: skip
        check_listed_files(folder, manifest["files"], again)
    except RecordError as err:
        raise ConfigError(str(err)) from None
    return folder, manifest


def whole_token(tok: object) -> int:
    """A token whose text is one whole ASCII character (the worker forces it where any token will do)."""
    for text in ("a", "e", " ", "x", "0"):
        tid = tok.token_to_id(text)
        if tid is not None:
            return tid
    raise ConfigError("the tokenizer has no single-character ASCII token; llama.cpp's engine cannot read it")


class LlamaCppWorker:
    """The worker process (worker.py) and its two pipes; stopped with the object or the interpreter."""

    def __init__(self, settings: dict) -> None:
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (lives as long as the worker) llama.cpp's log: its last lines go into any error
        cmd = [sys.executable, "-m", "moemla.inference.llamacpp.worker", json.dumps(settings)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [_src(), os.environ.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, env=env)
        self._finalizer = weakref.finalize(self, _stop, self.proc)
        self.path = settings["path"]
        first = self._answer()
        if "error" in first:
            self.close()
            if first["error"] == "no-binding":
                raise ConfigError(f"the llama.cpp engine needs the xllamacpp binding: {EXTRA}")
            raise ConfigError(f"llama.cpp cannot load {self.path} ({first['error']}; {self.tail()}); export the run "
                              "again with `moemla export RUN OUT --format gguf`")  # fmt: skip

    def ask(self, request: dict) -> np.ndarray | dict:
        """One request's answer: a float32 array, or the JSON of a `generate`."""
        try:
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise LlamaCppError(f"llama.cpp's worker stopped ({self.tail()})") from None
        header = self._answer()
        if "error" in header:
            raise LlamaCppError(f"llama.cpp: {header['error']}")
        if "json" in header:
            return header["json"]
        shape = tuple(header["shape"])
        data = self.proc.stdout.read(4 * int(np.prod(shape)))
        return np.frombuffer(data, dtype=np.float32).reshape(shape)

    def _answer(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=TIMEOUT_S)
            raise ConfigError(f"llama.cpp stopped while reading {self.path} (exit {self.proc.returncode}; "
                              f"{self.tail()})")  # fmt: skip
        return json.loads(line)

    def tail(self) -> str:
        """The last lines of llama.cpp's log that say what went wrong."""
        self.log.seek(0)
        lines = [x for x in self.log.read().decode(errors="replace").splitlines() if x.strip()]
        bad = [x for x in lines if any(w in x.lower() for w in ("error", "failed", "invalid", "exception"))]
        return " / ".join((bad or lines)[-2:])[:300] or "no log"

    def close(self) -> None:
        self._finalizer()


def _src() -> str:
    """The folder moemla is imported from, for the worker's import path (an uninstalled checkout works too)."""
    import moemla

    return str(Path(moemla.__file__).resolve().parents[1])


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _tensor(values: np.ndarray) -> torch.Tensor:
    import torch

    return torch.from_numpy(np.array(values))


class LlamaCppDecoder:
    """A GGUF export folder behind the Decoder interface: `slots` rows decode together in llama.cpp (more are
    queued); `exact` keeps llama.cpp's cache in f32 and its flash attention off, as the parity tests need, else its
    defaults (an f16 cache), as users run it."""

    max_batch = None

    def __init__(self, path: str | Path, *, slots: int = 1, threads: int | None = None, exact: bool = False,
                 ctx: int | None = None) -> None:  # fmt: skip
        from moemla.data.tokenizer import load_tokenizer
        from moemla.folders import TOKENIZER_FILE

        self.folder, self.manifest = read_gguf_manifest(path)
        model_cfg = ModelConfig.from_dict(self.manifest["config"])
        self.tokenizer = load_tokenizer(self.folder / TOKENIZER_FILE)
        self.ctx = min(ctx or model_cfg.max_seq_len, model_cfg.max_seq_len)  # cells per slot
        # the context the decode loop, truncation and the server plan with: what llama.cpp holds (max_len)
        self.cfg = model_cfg.replace(max_seq_len=self.ctx - 1)
        self.slots, self.exact = slots, exact
        settings = {"path": str(self.folder / GGUF_FILE), "slots": slots, "ctx": self.ctx, "exact": exact,
                    "threads": threads or _threads(), "vocab": model_cfg.vocab_size,
                    "whole": whole_token(self.tokenizer), "verbosity": 3}  # fmt: skip
        self.worker = LlamaCppWorker(settings)
        self.rows: list[list[int]] = []

    @property
    def length(self) -> int:
        return max((len(r) for r in self.rows), default=0)

    @property
    def max_len(self) -> int:
        # llama.cpp's server takes a prompt only while a cell is left for the token it samples next (and caps a
        # slot at the context the file records), so a row holds one token less than the model's context
        return self.ctx - 1

    @property
    def cache_nbytes(self) -> int:
        """What llama.cpp allocates: every slot's cells at its cache type (the latent and the RoPE key)."""
        return self.kv_bytes_per_token * self.slots * self.ctx

    @property
    def kv_bytes_per_token(self) -> int:
        return int(self.manifest["kv_cache_bytes_per_token"]["f32" if self.exact else "f16"])

    @property
    def weight_nbytes(self) -> int:
        return int(self.manifest["files"][GGUF_FILE])

    def prefill(self, prompts: Sequence[Sequence[int]], max_len: int | None = None) -> torch.Tensor:
        if max_len is not None and max_len > self.max_len:
            raise ValueError(f"llama.cpp holds {self.max_len} tokens of this model's context; {max_len} are needed")
        rows = [[int(t) for t in p] for p in prompts]
        if not rows or min(map(len, rows)) == 0:
            raise ValueError("every prompt needs at least one token")
        if max(map(len, rows)) > self.max_len:
            raise ValueError(f"a prompt of {max(map(len, rows))} tokens exceeds the {self.max_len} tokens llama.cpp "
                             "holds of this model's context")  # fmt: skip
        self._check_ids([t for r in rows for t in r])
        self.rows = rows
        return _tensor(self.worker.ask({"op": "next", "rows": self.rows}))

    def step(self, tokens: Sequence[int]) -> torch.Tensor:
        if not self.rows:
            raise ValueError("step before prefill: prefill the prompts first")
        if self.length >= self.max_len:
            raise ValueError(f"llama.cpp holds {self.max_len} tokens; {self.length + 1} requested")
        tokens = [int(t) for t in tokens]
        self._check_ids(tokens)
        self.rows = [[*r, t] for r, t in zip(self.rows, tokens, strict=True)]
        return _tensor(self.worker.ask({"op": "next", "rows": self.rows}))

    def reset(self) -> None:
        self.rows = []

    def logits(self, ids: Sequence[int]) -> torch.Tensor:
        """(T, V) log-probabilities after every prefix of one sequence (one request per position: slow; perplexity
        uses target_logprobs)."""
        rows = [[int(t) for t in ids[: t + 1]] for t in range(len(ids))]
        self._check_ids(rows[-1] if rows else [])
        self.reset()
        return _tensor(np.concatenate([self.worker.ask({"op": "next", "rows": [r]}) for r in rows]))

    def target_logprobs(self, ids: Sequence[int], targets: Sequence[int]) -> np.ndarray:
        """(T,) log p(targets[t] | ids[:t + 1]) where targets is ids shifted by one (perplexity's windows)."""
        seq = [int(t) for t in ids] + [int(targets[-1])]
        if seq[1:-1] != [int(t) for t in targets[:-1]]:
            raise ValueError("targets must be the window's tokens shifted by one")
        self._check_ids(seq)
        self.reset()
        return np.asarray(self.worker.ask({"op": "score", "ids": seq}))

    def generate_native(self, prompts: Sequence[Sequence[int]], n: int) -> dict:
        """llama.cpp's own greedy loop over the prompts (its sampler and timings): what bench measures."""
        return self.worker.ask({"op": "generate", "prompts": [list(map(int, p)) for p in prompts], "n": n})

    def _check_ids(self, ids: Sequence[int]) -> None:
        if ids and (min(ids) < 0 or max(ids) >= self.cfg.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.cfg.vocab_size}); got {min(ids)}..{max(ids)}")

    def close(self) -> None:
        self.worker.close()


def _threads() -> int:
    """As many threads as torch uses (the same CPUs the other engines get), without importing torch."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
