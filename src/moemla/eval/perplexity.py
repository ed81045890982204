"""Validation loss, perplexity with a confidence interval, bits per byte, and per-layer expert-load CV."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from moemla.data.shards import eval_batches
from moemla.device import autocast
from moemla.inference.decoder import Decoder
from moemla.model import Transformer
from moemla.model.moe import load_cv


@torch.no_grad()
def evaluate(
    model: Transformer | Decoder,
    shards: list[np.ndarray],
    *,
    seq_len: int,
    batch_size: int,
    max_tokens: int | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    token_bytes: np.ndarray | None = None,
) -> dict[str, object]:
    """Mean next-token loss over fixed validation windows; the 95% interval treats batches as samples.

    With `token_bytes` (data.tokenizer.token_bytes) the result also has `bits_per_byte`. A Decoder (an ONNX
    export, the CPU engine) is scored window by window through Decoder.logits, in its own precision.
    """
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"--max-tokens must be at least 1 (or left out for the whole split), got {max_tokens}")
    torch_model = isinstance(model, Transformer)
    was_training = torch_model and model.training
    for moe in model.moe_layers() if torch_model else []:
        moe.eval_load.zero_()
    if torch_model:
        model.eval()
    losses, counts, n_bytes = [], [], 0
    batches: Iterator = eval_batches(shards, seq_len, batch_size, max_tokens)
    for x, y in batches:
        if torch_model:
            with autocast(device, dtype):
                _, loss = model(x.to(device), y.to(device))
        else:
            loss = decoder_loss(model, x, y)
        losses.append(float(loss))
        counts.append(y.numel())
        n_bytes += _text_bytes(y, token_bytes) if token_bytes is not None else 0
    if torch_model:
        model.train(was_training)
    loss_arr, w = np.array(losses), np.array(counts, dtype=np.float64)
    nats = float((loss_arr * w).sum())  # the total loss over every target token
    mean = nats / float(w.sum())
    loads = model.expert_loads("eval") if torch_model else []
    cv = [load_cv(load) for load in loads] if loads else None
    # routed experts per token, over layers: top-k's k, or what top-p routing chose on this text
    active = float(sum(int(load.sum()) for load in loads)) / (len(loads) * float(w.sum())) if loads else None
    return {
        "val_loss": mean,
        "val_ppl": _exp(mean),
        "val_ppl_ci95": ppl_interval(mean, loss_arr),
        "bits_per_byte": bits_per_byte(nats, n_bytes) if token_bytes is not None else None,
        "tokens": int(w.sum()),
        "batches": len(losses),
        "expert_load_cv": cv,
        "active_experts": active,
    }


def decoder_loss(dec: Decoder, x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean next-token loss of windows x (B, T) with targets y (B, T), one window at a time through dec.logits."""
    total = 0.0
    score = getattr(dec, "target_logprobs", None)  # an engine that reads off only the targets' (llama.cpp)
    for row, target in zip(x.tolist(), y, strict=True):
        if score is not None:
            total -= float(np.asarray(score(row, target.tolist()), dtype=np.float64).sum())
            continue
        logprobs = dec.logits(row).float().log_softmax(-1)  # (T, V)
        total -= float(logprobs.gather(-1, target[:, None]).sum())
    return total / y.numel()


def _exp(x: float) -> float:
    """e^x, infinite rather than an OverflowError for the losses of a diverged model."""
    return math.exp(x) if x < 700 else math.inf


def ppl_interval(mean: float, losses: np.ndarray) -> list[float] | None:
    """95% interval of the perplexity with batches as samples; None (JSON null) from a single batch."""
    if len(losses) < 2:
        return None
    half = 1.96 * float(losses.std(ddof=1)) / math.sqrt(len(losses))
    return [_exp(mean - half), _exp(mean + half)]


def bits_per_byte(nats: float, n_bytes: int) -> float | None:
    """Total loss in bits over the UTF-8 bytes of the text it predicts (special tokens cost bits, add no bytes).

    Unlike perplexity this does not depend on the tokenizer: a BPE-4096 and a GPT-2 run compare.
    """
    return nats / math.log(2) / n_bytes if n_bytes else None


def _text_bytes(targets: torch.Tensor, token_bytes: np.ndarray) -> int:
    return int(token_bytes[targets.numpy()].sum())
