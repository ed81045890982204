"""A torch-free decoder for CPU inference: the model's weights as numpy arrays, one sequence at a time.

Why it exists: at batch 1 a decode step is a chain of matrix-vector products whose weights come
from DRAM. Measured on our CPU machine (BENCHMARKS.md), PyTorch's eager kernels read them at
~8-25 GB/s and add ~5-10 us per op; numpy's OpenBLAS reads the LM head at ~49 GB/s and calls cost
~1 us. Same math as `Transformer` (a test holds every variant's logits to it within 1e-4); the
weights are stored in the layout numpy streams fastest, (in, out), which costs one extra copy of
them while the decoder lives.
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

from moemla.config import CPU_PORTABLE, ConfigError, ModelConfig, check_portable
from moemla.inference.cpu.layers import Block, Fused, Linear, Weights, norm, rope_tables
from moemla.inference.cpu.quant import matmul, to_int8


def load_kernels() -> ModuleType:
    """moemla.inference.cpu.kernels, or a ConfigError saying how to get numba."""
    try:
        from moemla.inference.cpu import kernels
    except ImportError as err:
        raise ConfigError(
            f"the compiled decoder needs numba ({err}); install it with: pip install 'moemla[fast]' "
            "(or pip install numba), or use the plain numpy engine"
        ) from err
    except RuntimeError as err:  # numba found no writable folder for its on-disk cache of the kernels
        raise ConfigError(
            f"numba cannot cache the compiled kernels ({err}); set NUMBA_CACHE_DIR to a writable folder"
        ) from err
    return kernels


def _arrays(obj: object) -> list[np.ndarray]:
    """Every distinct numpy array reachable from obj's attributes (blocks, Linear layers, tuples, dicts)."""
    found: dict[int, np.ndarray] = {}
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, np.ndarray):
            found.setdefault(id(item), item)
        elif isinstance(item, list | tuple):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, Block | Linear | Fused | NumpyDecoder):
            stack.extend(vars(item).values())
    return list(found.values())


if TYPE_CHECKING:
    import torch


def _tensor(logits: np.ndarray) -> torch.Tensor:
    """The Decoder interface's one return type, without a copy; only prefill and step need torch (forward, the
    numpy API, runs where torch is not installed)."""
    import torch

    return torch.from_numpy(logits)


def check_supported(cfg: ModelConfig) -> None:
    check_portable(cfg, "the CPU engine", "use --engine torch", CPU_PORTABLE)


class NumpyDecoder:
    """Prefill and decode one sequence with numpy; `forward` appends to the cache like Transformer's.

    Implements moemla.inference.decoder.Decoder for a batch of one (prefill, step, reset; numpy logits).
    """

    max_batch = 1

    def __init__(
        self,
        cfg: ModelConfig,
        weights: Weights,
        max_len: int | None = None,
        compiled: bool = False,
        quantize: str = "none",
    ) -> None:
        """compiled=True runs one-token steps through the numba kernels (pip install "moemla[fast]");
        quantize="int8" holds the large matrices as int8 with per-output-channel scales (quant.py)."""
        check_supported(cfg)
        if quantize not in ("none", "int8"):
            raise ConfigError(f"quantize must be none or int8, not {quantize!r}")
        self.quantized = quantize == "int8"
        self.cfg, self.max_len = cfg, max_len or cfg.max_seq_len
        self.compiled = compiled
        if self.max_len > cfg.max_seq_len:
            raise ValueError(f"max_len={self.max_len} exceeds the model's max_seq_len={cfg.max_seq_len}")
        w = {name: np.asarray(a, dtype=np.float32) for name, a in weights.items()}
        self.wte_t = np.ascontiguousarray(w["wte.weight"].T)  # (C, V): the LM head's fast layout, and the lookup
        self.wpe = w.get("wpe.weight")
        self.ln_f = (w["ln_f.weight"], w.get("ln_f.bias"))  # no bias: RMSNorm
        self.rope = rope_tables(cfg.rope_dim, cfg.max_seq_len, cfg.rope_base) if cfg.positions == "rope" else None
        self.kernels = kernels = load_kernels() if compiled else None
        self.blocks = [Block(cfg, w, i, self.max_len, kernels) for i in range(cfg.n_layers)]
        self.wte_q: np.ndarray | None = None  # once int8: the tied embedding as rows (V, C), scales (V,)
        self.wte_scale: np.ndarray | None = None
        if quantize == "int8":
            for block in self.blocks:
                block.quantize()
            self.wte_q, self.wte_scale = to_int8(self.wte_t.T)
            self.wte_t = None
        self.length = 0

    def prefill(self, prompts: list[list[int]], max_len: int | None = None) -> torch.Tensor:
        """Decoder.prefill for one prompt: logits (1, V) of its last token; the cache starts over."""
        if len(prompts) != 1:
            raise ValueError(f"the CPU engine decodes one sequence at a time; got {len(prompts)} (use --engine torch)")
        if max_len is not None and max_len > self.max_len:
            raise ValueError(f"the decoder's cache holds {self.max_len} tokens; {max_len} are needed")
        self.reset()
        return _tensor(self.forward(list(prompts[0]))[None])

    def step(self, tokens: list[int]) -> torch.Tensor:
        """Decoder.step: one token (a list of one) -> logits (1, V)."""
        return _tensor(self.forward([int(tokens[0])])[None])

    def logits(self, ids: list[int]) -> torch.Tensor:
        """Decoder.logits: (T, V) of every position of one sequence, from an empty cache."""
        self.reset()
        return _tensor(self.forward(list(ids), all_logits=True))

    @classmethod
    def from_model(
        cls, model: object, max_len: int | None = None, compiled: bool = False, quantize: str = "none"
    ) -> NumpyDecoder:
        """From a torch `Transformer` (its current weights, copied; a model it cannot run is refused first)."""
        check_supported(model.cfg)
        state = {name: t.detach().float().cpu().numpy() for name, t in model.state_dict().items()}
        return cls(model.cfg, state, max_len, compiled, quantize)

    @classmethod
    def from_safetensors(
        cls, cfg: ModelConfig, path: str, max_len: int | None = None, compiled: bool = False
    ) -> NumpyDecoder:
        """From a checkpoint's model.safetensors, without torch."""
        from safetensors.numpy import load_file

        return cls(cfg, load_file(path), max_len, compiled)

    def reset(self) -> None:
        self.length = 0

    @property
    def cache_nbytes(self) -> int:
        """Bytes of the KV cache for all `max_len` positions (what Transformer's KVCache holds too)."""
        arrays = [a for b in self.blocks for a in ([b.k, b.v] if self.cfg.attention == "mha" else b.cache.values())]
        return sum(a.nbytes for a in arrays)

    @property
    def weight_nbytes(self) -> int:
        """Bytes of the weights this decoder holds (its own float32 copy, in its layout)."""
        return sum(a.nbytes for a in _arrays(self)) - self.cache_nbytes

    def forward(self, tokens: list[int], all_logits: bool = False) -> np.ndarray:
        """Token ids (T,) after the cached ones -> logits of the last token (V,), or of all (T, V)."""
        t, start = len(tokens), self.length
        if t == 0:
            raise ValueError("no tokens to run; give at least one")
        if start + t > self.max_len:
            raise ValueError(f"{start + t} tokens exceed the decoder's cache of {self.max_len}; reset() or shorten")
        ids = np.asarray(tokens)
        if ids.min() < 0 or ids.max() >= self.cfg.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.cfg.vocab_size}); got {ids.min()}..{ids.max()}")
        if self.wte_q is None:
            x = self.wte_t[:, ids].T  # (T, C)
        else:
            x = self.wte_q[ids].astype(np.float32) * self.wte_scale[ids, None]
        if self.wpe is not None:
            x = x + self.wpe[start : start + t]
        for block in self.blocks:
            x = block(x, start, self.rope)
        self.length += t
        h = norm(x if all_logits else x[-1:], self.ln_f)
        if self.wte_q is None:
            logits = h @ self.wte_t  # (T or 1, V); tied embedding
        elif self.compiled and h.shape[0] == 1:
            logits = self.kernels.lm_head_q8(h[0], self.wte_q, self.wte_scale)[None]
        else:
            logits = matmul(h, None, self.wte_q, self.wte_scale)
        return logits if all_logits else logits[0]
