"""TrainConfig (run settings, §3.3's recipe as defaults), the LR schedule and AdamW's parameter groups."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from moemla.config import ConfigError, doc

AmpKind = Literal["auto", "bf16", "fp16", "none"]


@dataclass(frozen=True)
class TrainConfig:
    # length: --max-steps, or --tokens (converted to steps); neither means 1000 steps
    max_steps: int | None = doc(None, "optimizer steps to train (default 1000 when --tokens is not given either)")
    tokens: int | None = doc(None, "training tokens instead of --max-steps, rounded up to whole steps")
    seed: int = doc(1337, "seed of the initial weights, dropout and the data order")

    # batch (§3.3: 128 sequences of 512 tokens per optimizer step)
    batch_size: int = doc(128, "sequences per optimizer step, over all processes")
    micro_batch_size: int = doc(16, "sequences per forward; gradient accumulation makes up the rest")
    seq_len: int = doc(512, "tokens per training sequence, at most the model's max_seq_len")

    # AdamW, linear warmup then cosine decay (§3.3)
    lr: float = doc(3e-4, "peak learning rate")
    min_lr: float = doc(1e-5, "learning rate at the end of the cosine decay")
    warmup_frac: float = doc(0.1, "share of the steps spent warming up linearly")
    weight_decay: float = doc(0.1, "AdamW weight decay; not on norms, biases or embeddings")
    beta1: float = doc(0.9, "AdamW beta1")
    beta2: float = doc(0.95, "AdamW beta2")
    grad_clip: float = doc(1.0, "max global gradient norm; 0 turns clipping off")

    # execution
    device: str = doc("auto", "cpu, cuda, cuda:N or auto (cuda when available)")
    amp: AmpKind = doc("auto", "autocast precision; auto: bf16 on CUDA, none on CPU; fp16 scales the loss")
    compile: bool | None = doc(None, "torch.compile the model; auto: on CUDA, not on CPU")

    # evaluation, logging, checkpoints
    eval_interval: int = doc(100, "steps between validation passes (and one at the end)")
    eval_tokens: int = doc(262_144, "validation tokens per pass, at most")
    ckpt_interval: int = doc(100, "steps between checkpoints (and one at the end)")
    keep_checkpoints: int = doc(2, "checkpoints kept; older ones go once a newer one is complete")
    log_interval: int = doc(10, "steps between metrics.jsonl records")

    def __post_init__(self) -> None:
        for name in ("batch_size", "micro_batch_size", "seq_len", "eval_interval", "ckpt_interval", "log_interval"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_steps", "tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be at least 1, got {value}")
        if self.max_steps is not None and self.tokens is not None:
            raise ConfigError("give --max-steps or --tokens, not both")
        if not 0 <= self.warmup_frac < 1:
            raise ConfigError(f"warmup_frac must be in [0, 1), got {self.warmup_frac}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"need 0 <= min_lr <= lr and lr > 0, got lr={self.lr}, min_lr={self.min_lr}")
        if self.keep_checkpoints < 1:
            raise ConfigError("keep_checkpoints must be at least 1")
        if self.eval_tokens < 1:
            raise ConfigError(f"eval_tokens must be at least 1, got {self.eval_tokens}")
        if not self.grad_clip >= 0:  # also catches NaN
            raise ConfigError(f"grad_clip must be >= 0 (0 turns clipping off), got {self.grad_clip}")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def steps(self) -> int:
        if self.max_steps is not None:
            return self.max_steps
        if self.tokens is not None:
            return math.ceil(self.tokens / self.tokens_per_step)
        return 1000

    def accumulation(self, world_size: int) -> int:
        """Micro-batches per process per optimizer step."""
        per_round = self.micro_batch_size * world_size
        if self.batch_size % per_round:
            raise ConfigError(
                f"batch_size={self.batch_size} is not a multiple of micro_batch_size x processes = "
                f"{self.micro_batch_size} x {world_size}; change one of them"
            )
        return self.batch_size // per_round

    def replace(self, **changes: object) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> TrainConfig:
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown TrainConfig field(s): {', '.join(sorted(unknown))}")
        return cls(**data)  # type: ignore[arg-type]


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warmup over warmup_frac of the steps, then cosine decay from lr to min_lr (§3.3)."""
    total = tc.steps
    warmup = int(tc.warmup_frac * total)
    if step < warmup:
        return tc.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return tc.min_lr + 0.5 * (tc.lr - tc.min_lr) * (1.0 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, object]]:
    """Weight decay on matrices (attention, experts, router); none on norms, biases or embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_embedding = name.startswith(("wte.", "wpe."))
        (decay if p.ndim >= 2 and not is_embedding else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, tc: TrainConfig) -> torch.optim.AdamW:
    # fused: one kernel for every parameter on CUDA; the CPU keeps the for-each update its numbers were taken with
    fused = all(p.is_cuda for p in model.parameters())
    return torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=tc.lr, betas=(tc.beta1, tc.beta2), fused=fused)
