import os

import pytest
import torch

from moemla import ModelConfig, Transformer
from moemla.config import VARIANTS

ALL_VARIANTS = list(VARIANTS)

if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # pytest -n N: share the cores, or N x threads oversubscribe them
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def build(variant: str, size: str = "debug", seed: int = 0, **overrides: object) -> Transformer:
    """A model in eval mode with dropout off, so two forwards are comparable."""
    torch.manual_seed(seed)
    cfg = ModelConfig.from_preset(size, variant, dropout=0.0, **overrides)
    return Transformer(cfg).eval()


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
