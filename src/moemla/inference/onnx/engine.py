"""Decode an ONNX export folder with onnxruntime and numpy: the Decoder interface without torch.

The graph takes the whole past cache in and returns it grown by the new tokens (present = past + new), in the
model's own layout: MLA layers move only their latents, so the bytes copied per step are MLA's small cache.
Sampling, the token budget and the fit check stay in the one decode loop (inference/decode.py); this engine only
prefills and steps. Only prefill and step return torch tensors (the Decoder interface's type, wrapping numpy
without a copy); `OnnxSession` and `logits` are numpy through and through.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from moemla.config import ConfigError, ModelConfig
from moemla.folders import EXPORT_KEYS, RUN_FILE, RecordError, check_listed_files, check_record, read_record
from moemla.inference.onnx import EXTRA, FORMAT, MANIFEST, MODEL, VERSION
from moemla.inference.padding import left_pad

if TYPE_CHECKING:
    import torch


def is_onnx_folder(path: str | Path) -> bool:
    """Whether path is an export folder (a manifest.json and no run.json); read_manifest then says what is wrong
    with one that is damaged."""
    return (Path(path) / MANIFEST).is_file() and not (Path(path) / RUN_FILE).is_file()


def read_manifest(folder: str | Path) -> dict:
    """The folder's manifest, checked: format, version, and every file it lists present at its recorded size."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise ConfigError(f"{folder} has no {MANIFEST}: export it again with `moemla export RUN OUT --format onnx`")
    again = "export the model again with `moemla export RUN OUT --format onnx`"
    try:
        manifest = read_record(path, {"format": str}, again)
        if manifest["format"] != FORMAT:
            raise ConfigError(f"{path} is not a moemla ONNX manifest; {again}")
        if manifest.get("version") != VERSION:
            raise ConfigError(f"{folder} was written by another moemla (graph version {manifest.get('version')}, "
                              f"this one reads {VERSION}); export it again with this moemla")  # fmt: skip
        check_record(manifest, path, EXPORT_KEYS, again)
        check_listed_files(folder, manifest["files"], "export it again")
    except RecordError as err:
        raise ConfigError(str(err)) from None
    return manifest


EXPORT_RUNTIMES = {
    "onnx": "an ONNX export (one checkpoint, quantized at export, run on the CPU by onnxruntime)",
    "gguf": "a GGUF export (one checkpoint, quantized at export, run on the CPU by llama.cpp)",
}


def refuse_export_flags(folder: str | Path, kind: str = "onnx", **asked: bool) -> None:
    """The one refusal of flags an export folder (`kind` onnx or gguf) cannot honour (generate, serve, bench and
    eval call it): `asked` maps a flag's name (device, checkpoint, quantize, ...) to whether it was given."""
    given = [f"--{name.replace('_', '-')}" for name, on in asked.items() if on]
    if given:
        raise ConfigError(f"{folder} is {EXPORT_RUNTIMES[kind]}: drop {', '.join(given)}")


def _ort() -> object:
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError(f"the ONNX engine needs onnxruntime: {EXTRA}") from None
    return onnxruntime


class OnnxSession:
    """The graph and the cache it grows: prefill a left-padded batch, then one token per row per step (numpy)."""

    def __init__(self, path: Path, cfg: ModelConfig, cache: list[dict], threads: int | None = None) -> None:
        ort = _ort()
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own types for a truncated or foreign file
            first = str(err).splitlines()[0][:200]
            raise ConfigError(f"onnxruntime cannot load {path} ({first}); export the model again") from None
        self.cfg, self.cache_spec, self.ortvalue = cfg, cache, ort.OrtValue
        self.past: list[object] = []  # OrtValues: a step's present is the next step's past without a numpy copy
        self.mask = np.zeros((0, 0), dtype=np.int64)

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    @property
    def cache_nbytes(self) -> int:
        return sum(int(np.prod(a.shape())) * 4 for a in self.past)  # float32

    def _run(self, ids: np.ndarray, every: bool = False) -> np.ndarray:
        """ids (B, T) after the cache -> logits (B, T, V) of every new position, or (B, 1, V) of the last; the cache
        grows by T."""
        value = self.ortvalue.ortvalue_from_numpy
        b, t = ids.shape
        at = np.tile(np.arange(t) if every else np.array([t - 1]), (b, 1)).astype(np.int64)  # (B, K)
        feed = {"input_ids": value(ids), "attention_mask": value(self.mask), "logits_at": value(at)}
        feed |= {c["past"]: a for c, a in zip(self.cache_spec, self.past, strict=True)}
        logits, *self.past = self.session.run_with_ort_values(None, feed)
        return logits.numpy()

    def prefill(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        """Prompts left-padded into one batch (token 0, masked) -> logits (B, V) of each one's last token."""
        return self._prefill(prompts, every=False)[:, -1]

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Logits (T, V) of every position of one sequence, from an empty cache (perplexity)."""
        return self._prefill([ids], every=True)[0]

    def _prefill(self, prompts: Sequence[Sequence[int]], every: bool) -> np.ndarray:
        rows, pad = left_pad(prompts)
        longest = len(rows[0])
        if longest > self.cfg.max_seq_len:
            raise ValueError(f"a prompt of {longest} tokens exceeds the model's context of {self.cfg.max_seq_len}")
        ids = np.array(rows, dtype=np.int64)  # (B, T)
        self._check_ids(ids)
        self.mask = (np.arange(longest)[None] >= np.array(pad)[:, None]).astype(np.int64)  # (B, T): 0 on the padding
        sizes = {"batch": len(prompts), "past": 0}
        empty = [np.zeros([sizes.get(n, n) for n in c["shape"]], np.float32) for c in self.cache_spec]
        self.past = [self.ortvalue.ortvalue_from_numpy(a) for a in empty]
        return self._run(ids, every)

    def step(self, tokens: Sequence[int]) -> np.ndarray:
        """One token per row -> logits (B, V)."""
        if not self.past:
            raise ValueError("step before prefill: prefill the prompts first")
        if self.length >= self.cfg.max_seq_len:
            raise ValueError(f"the context holds {self.cfg.max_seq_len} tokens; {self.length + 1} requested")
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1, 1)  # (B, 1)
        self._check_ids(ids)
        self.mask = np.concatenate([self.mask, np.ones((ids.shape[0], 1), np.int64)], axis=1)
        return self._run(ids)[:, -1]

    def _check_ids(self, ids: np.ndarray) -> None:
        if ids.size and (ids.min() < 0 or ids.max() >= self.cfg.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.cfg.vocab_size}); got {ids.min()}..{ids.max()}")

    def reset(self) -> None:
        self.past, self.mask = [], np.zeros((0, 0), dtype=np.int64)


def _tensor(logits: np.ndarray) -> torch.Tensor:
    import torch

    return torch.from_numpy(np.ascontiguousarray(logits))


class OnnxDecoder:
    """An ONNX export folder behind the Decoder interface (any batch size); `moemla generate/serve/eval` pick it
    when given a folder with a moemla ONNX manifest."""

    max_batch = None

    def __init__(self, folder: str | Path, threads: int | None = None) -> None:
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        self.cfg = ModelConfig.from_dict(self.manifest["config"])
        self.session = OnnxSession(self.folder / MODEL, self.cfg, self.manifest["cache"], threads)

    @property
    def length(self) -> int:
        return self.session.length

    @property
    def max_len(self) -> int:
        return self.cfg.max_seq_len

    @property
    def cache_nbytes(self) -> int:
        return self.session.cache_nbytes

    @property
    def weight_nbytes(self) -> int:
        return sum(self.manifest["files"].values())

    def prefill(self, prompts: Sequence[Sequence[int]], max_len: int | None = None) -> torch.Tensor:
        if max_len is not None and max_len > self.cfg.max_seq_len:
            raise ValueError(f"the model's context holds {self.cfg.max_seq_len} tokens; {max_len} are needed")
        return _tensor(self.session.prefill(prompts))

    def step(self, tokens: Sequence[int]) -> torch.Tensor:
        return _tensor(self.session.step(tokens))

    def reset(self) -> None:
        self.session.reset()

    def logits(self, ids: Sequence[int]) -> torch.Tensor:
        return _tensor(self.session.logits(ids))
