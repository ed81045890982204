"""moemla: small MoE-MLA-RoPE language models (arXiv 2508.01261) to train, measure and deploy."""

from moemla.config import ModelConfig

__all__ = ["KVCache", "ModelConfig", "Transformer"]
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # torch loads on first use of the model, so that torch-free parts (config, NumpyDecoder) import without it
    if name in ("KVCache", "Transformer"):
        from moemla import model

        return getattr(model, name)
    raise AttributeError(f"module 'moemla' has no attribute {name!r}")
