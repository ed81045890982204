"""The decoder: pre-norm blocks (Eq. 11-12), tied embeddings, learned or rotary positions."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moemla.config import NORM_EPS, ModelConfig
from moemla.model.attention import MHA, MLA, Angles
from moemla.model.dropout import Dropout
from moemla.model.kv_cache import KVCache, Write
from moemla.model.moe import MLP, MoE, RoutedExperts, Router, load_cvs
from moemla.model.rope import rope_tables


def make_norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    """The block's normalisation: LayerNorm (Eq. 11-12, weight and bias) or RMSNorm (a weight only)."""
    dim = dim or cfg.dim
    return nn.LayerNorm(dim) if cfg.norm == "layernorm" else nn.RMSNorm(dim, eps=NORM_EPS)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.ln1 = make_norm(cfg)
        self.attn = MLA(cfg) if cfg.attention == "mla" else MHA(cfg)
        self.ln2 = make_norm(cfg)
        self.ffn = MoE(cfg) if cfg.ffn == "moe" else MLP(cfg.dim, cfg.dense_inter_dim, cfg.bias, cfg.ffn_activation)
        self.drop = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rope: Angles | None, at: Write | None) -> torch.Tensor:
        h = x + self.drop(self.attn(self.ln1(x), rope, at, self.layer))  # Eq. 11
        z = self.ln2(h)
        return h + self.drop(self.ffn(z, at) if isinstance(self.ffn, MoE) else self.ffn(z))  # Eq. 12


def _check_room(t: int, max_seq_len: int, cache: KVCache | None) -> None:
    """A forward of t tokens fits the model's context and the cache (where the cache's slots start is the
    caller's to check: it lives on the device, see KVCache)."""
    if t > max_seq_len:
        raise ValueError(
            f"sequence of {t} tokens exceeds the model's context (max_seq_len={max_seq_len}); "
            "shorten the input or use a model with a longer context"
        )
    if cache is not None and t > cache.max_len:
        raise ValueError(f"KV cache holds {cache.max_len} tokens; {t} requested")


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.wpe = nn.Embedding(cfg.max_seq_len, cfg.dim) if cfg.positions == "learned" else None
        self.drop = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.ln_f = make_norm(cfg)
        if cfg.positions == "rope":
            cos, sin = rope_tables(cfg.rope_dim, cfg.max_seq_len, cfg.rope_base)
            self.register_buffer("rope_cos", cos, persistent=False)  # (T_max, D/2)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2: scale the residual-branch output projections by 1/sqrt(2L)
        for name, p in self.named_parameters():
            if name.endswith(("wo.weight", "w2.weight", "experts.w2")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, Router | RoutedExperts):  # raw weight matrices, stacked per expert
            for p in module.parameters(recurse=False):
                nn.init.normal_(p, mean=0.0, std=0.02)

    def hidden(self, idx: torch.Tensor, cache: KVCache | None = None, filled: int | None = None) -> torch.Tensor:
        """idx (B, T) token ids -> final hidden states (B, T, C), after ln_f; appends to `cache` if given.
        filled: the cache's filled slots after this forward, from a caller that counts them (KVCache.write)."""
        t = idx.shape[1]
        _check_room(t, self.cfg.max_seq_len, cache)
        at = None if cache is None else cache.write(t, filled)
        x = self.wte(idx)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(t, device=idx.device) if at is None else cache.positions(at.slots))
        x = self.drop(x)
        rope = self.angles(t, at) if self.cfg.positions == "rope" else None
        for block in self.blocks:
            x = block(x, rope, at)
        if cache is not None:
            cache.advance(t)
        return self.ln_f(x)

    def angles(self, t: int, at: Write | None) -> Angles:
        """RoPE angles of the t new tokens and of every key slot; with a cache, gathered at the new tokens'
        device slots, so nothing depends on a Python int."""
        if at is None:
            return Angles(self.rope_cos[:t], self.rope_sin[:t], self.rope_cos[:t], self.rope_sin[:t])
        s = at.span
        return Angles(self.rope_cos.index_select(0, at.slots), self.rope_sin.index_select(0, at.slots),
                      self.rope_cos[:s], self.rope_sin[:s])  # fmt: skip

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        filled: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) token ids -> logits (B, T, V) and, given targets (B, T), the mean cross-entropy."""
        logits = F.linear(self.hidden(idx, cache, filled), self.wte.weight)  # (B, T, V); tied input/output embedding
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)
        return logits, loss

    def moe_layers(self) -> list[MoE]:
        return [blk.ffn for blk in self.blocks if isinstance(blk.ffn, MoE)]

    @torch.no_grad()
    def routing_bias_step(self) -> torch.Tensor:
        """Once per optimizer step (Algorithm 1): move each layer's biases; return the per-layer load CVs (L,)
        (empty for a dense model), left on the device so a GPU step reads them with its loss in one transfer."""
        cfg = self.cfg
        loads = [moe.update_bias(cfg.balance_rate, cfg.balance_rule) for moe in self.moe_layers()]
        return load_cvs(torch.stack(loads)) if loads else torch.zeros(0, dtype=torch.float64)

    def expert_loads(self, split: str = "eval") -> list[torch.Tensor]:
        """Per-layer routed-assignment counts (E,) accumulated in train or eval mode."""
        return [getattr(moe, f"{split}_load").clone() for moe in self.moe_layers()]

    def reset_expert_loads(self) -> None:
        for moe in self.moe_layers():
            moe.train_load.zero_()
            moe.eval_load.zero_()
