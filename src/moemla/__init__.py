"""moemla: small MoE-MLA-RoPE language models (arXiv 2508.01261) to train, measure and deploy."""

from moemla.config import ModelConfig
from moemla.model import KVCache, Transformer

__all__ = ["KVCache", "ModelConfig", "Transformer"]
__version__ = "0.1.0"
