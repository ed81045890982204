"""Dropout that is cheap on the CPU: masks from 15-bit random integers, and causal attention with dropout.

§3.3 trains with dropout 0.1 on the residual branches and on the attention weights. On the CPU, PyTorch draws
one Mersenne-twister number per masked element (`bernoulli_`), and `scaled_dot_product_attention` with
dropout leaves its fused kernel for a materialized path: at `tiny` (4 heads, 256 tokens, batch 16) dropout made
MHA's training step 1.7x as long as without it (BENCHMARKS.md, "CPU training step: dropout"). Here one 64-bit
draw gives four 15-bit uniforms, and attention computes its (T, T) weights once with a mask from those draws:
training steps 1.1-1.2x faster, validation loss -0.001 over 6 seeds of `tiny` MHA (paired p = 0.90).

Same distribution, different random stream: a CPU run after this change is not bitwise the run before it.
CUDA keeps PyTorch's fused kernels (Philox dropout inside flash attention), and so does anything traced by
torch.compile, whose generated code draws its own masks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_LEVELS = 1 << 15  # a mask element keeps when its 15-bit uniform is >= round(p * 2^15): p within 2^-16


def fast(x: torch.Tensor, p: float, training: bool) -> bool:
    """Whether our CPU path applies: training with dropout on, on the CPU, not inside a torch.compile trace."""
    return training and p > 0 and x.device.type == "cpu" and not torch.compiler.is_compiling()


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool mask of `shape`, each element True with probability 1 - p (to 2^-16), from the default generator
    (so torch.manual_seed and a checkpoint's saved RNG state replay it)."""
    n = math.prod(shape)
    draws = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_()  # [0, 2^63): bit 63 is 0
    uniform15 = draws.view(torch.int16)[:n] & (_LEVELS - 1)  # four 15-bit uniforms per draw, sign bit dropped
    return (uniform15 >= round(p * _LEVELS)).view(shape)


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """F.dropout(x, p, training), with the cheap mask on the CPU."""
    if not fast(x, p, training):
        return F.dropout(x, p, training)
    if p >= 1:
        return torch.zeros_like(x)
    return torch.where(keep_mask(x.shape, p, x.device), x, 0.0) * (1.0 / (1.0 - p))


class Dropout(nn.Module):
    """nn.Dropout with the cheap CPU mask (no parameters, so checkpoints are unchanged)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0 <= p <= 1:
            raise ValueError(f"dropout must be in [0, 1], got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def causal_attention_dropout(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + causal) with dropout p, times v: q, k, v (B, H, T, D) -> (B, H, T, D).

    The math of scaled_dot_product_attention(is_causal=True, dropout_p=p), in the order PyTorch's own
    materialized path uses, with the mask from keep_mask: fwd+bwd of one `tiny` layer 62 ms against SDPA's 103."""
    b, h, t, d = q.shape
    scores = torch.baddbmm(  # (B*H, T, T), the scale folded into the matmul
        q.new_zeros(()), q.flatten(0, 1), k.flatten(0, 1).transpose(1, 2), beta=0.0, alpha=1.0 / math.sqrt(d)
    ).view(b, h, t, t)
    future = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)  # (T, T): keys after the query
    weights = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
    weights = torch.where(keep_mask(weights.shape, p, q.device), weights, 0.0)
    return (weights @ v) * (1.0 / (1.0 - p))  # the 1/(1-p) rescale on (T, D) rows, not on (T, T)
