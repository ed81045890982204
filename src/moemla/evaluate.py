"""Validation loss, perplexity with a confidence interval, and per-layer expert-load CV."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import numpy as np
import torch

from moemla.data.shards import eval_batches
from moemla.model import Transformer
from moemla.model.moe import load_cv


def amp_dtype(device: torch.device, amp: str) -> torch.dtype | None:
    """The autocast dtype for an `amp` setting: auto means bf16 on CUDA and full precision on CPU."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate(
    model: Transformer,
    shards: list[np.ndarray],
    seq_len: int,
    batch_size: int,
    max_tokens: int | None,
    device: torch.device,
    dtype: torch.dtype | None = None,
) -> dict[str, object]:
    """Mean next-token loss over fixed validation windows; the 95% interval treats batches as samples."""
    was_training = model.training
    model.eval()
    for moe in model.moe_layers():
        moe.eval_load.zero_()
    losses, counts = [], []
    batches: Iterator = eval_batches(shards, seq_len, batch_size, max_tokens)
    for x, y in batches:
        with autocast(device, dtype):
            _, loss = model(x.to(device), y.to(device))
        losses.append(float(loss))
        counts.append(y.numel())
    model.train(was_training)
    loss_arr, w = np.array(losses), np.array(counts, dtype=np.float64)
    mean = float((loss_arr * w).sum() / w.sum())
    half = 1.96 * float(loss_arr.std(ddof=1)) / math.sqrt(len(losses)) if len(losses) > 1 else float("nan")
    cv = [load_cv(load) for load in model.expert_loads("eval")] if model.moe_layers() else None
    return {
        "val_loss": mean,
        "val_ppl": math.exp(mean),
        "val_ppl_ci95": [math.exp(mean - half), math.exp(mean + half)],
        "tokens": int(w.sum()),
        "batches": len(losses),
        "expert_load_cv": cv,
    }
