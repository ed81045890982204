"""Auxiliary-loss-free balancing (Algorithm 1) on a router skewed on purpose: the experiment behind the suite's
balancing test and `benchmarks/balancing.py`."""

from __future__ import annotations

import torch

from moemla.config import ModelConfig
from moemla.model.moe import MoE, load_cv


def skewed_router(n_experts: int = 62, top_k: int = 6, dim: int = 16) -> tuple[MoE, torch.Tensor]:
    """Routing where expert i's logit carries a fixed offset growing with i: a few experts win."""
    torch.manual_seed(0)
    cfg = ModelConfig(dim=dim, n_heads=4, n_routed_experts=n_experts, n_activated_experts=top_k, moe_inter_dim=4)
    moe = MoE(cfg)
    torch.nn.init.normal_(moe.router.weight, std=0.3)
    moe.router.weight.data[:, 0] = torch.linspace(0.0, 4.0, n_experts)
    x = torch.randn(2048, dim)
    x[:, 0] = 1.0  # constant feature: the offset applies to every token
    return moe, x


def run_balancing(moe: MoE, x: torch.Tensor, steps: int, rate: float, rule: str) -> float:
    """Training steps of forward then Algorithm 1's update; the CV of the last step's loads."""
    cv = 0.0
    for _ in range(steps):
        with torch.no_grad():
            moe(x[None])
        cv = load_cv(moe.update_bias(rate, rule))
    return cv
