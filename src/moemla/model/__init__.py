"""The MoE-MLA-RoPE model family: attention, MoE, RoPE, KV cache, transformer."""

from moemla.model.kv_cache import KVCache
from moemla.model.transformer import Transformer

__all__ = ["KVCache", "Transformer"]
