import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import moemla.model.moe as moe_module
from moemla import KVCache, ModelConfig
from moemla.accounting import active_params, expert_params, flops_per_token, kv_cache_bytes_per_token, total_params

from .conftest import ALL_VARIANTS, build

EXTRA = [dict(), dict(bias=False), dict(kv_compression=0.25), dict(n_shared_experts=0), dict(moe_inter_dim=24)]


@pytest.mark.parametrize("variant", ALL_VARIANTS)
@pytest.mark.parametrize("extra", EXTRA, ids=str)
def test_total_and_active_params_equal_the_modules(variant: str, extra: dict) -> None:
    model = build(variant, **extra)
    cfg = model.cfg
    assert total_params(cfg) == sum(p.numel() for p in model.parameters())
    idle = 0
    for moe in model.moe_layers():
        per_expert = sum(p[0].numel() for p in moe.experts.parameters())
        assert per_expert == expert_params(cfg)
        idle += (cfg.n_routed_experts - cfg.n_activated_experts) * per_expert
    assert active_params(cfg) == total_params(cfg) - idle


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_flops_per_token_equal_counted_flops(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The counter sees neither torch._grouped_mm nor fused SDPA: use the per-expert matmul fallback
    # (equal to the grouped path, see test_moe) and the math SDPA backend, whose full T x T score
    # matrix is what flops_per_token charges at context = T.
    monkeypatch.setattr(moe_module, "grouped_mm_supported", lambda a, b: False)
    model, t = build(variant), 24
    idx = torch.randint(0, model.cfg.vocab_size, (1, t))
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        model(idx)
    assert counter.get_total_flops() == t * flops_per_token(model.cfg, context=t)


@pytest.mark.parametrize("variant", ALL_VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_cache_bytes_equal_accounting(variant: str, dtype: torch.dtype) -> None:
    cfg = ModelConfig.from_preset("debug", variant)
    cache = KVCache(cfg, batch_size=3, max_len=20, dtype=dtype)
    name = "float32" if dtype == torch.float32 else "bfloat16"
    assert cache.bytes_per_token == kv_cache_bytes_per_token(cfg, name)
    assert cache.nbytes == 3 * 20 * kv_cache_bytes_per_token(cfg, name)


@pytest.mark.parametrize("size", ["tiny", "xs", "s", "m", "l", "xl"])
def test_mla_at_half_rank_holds_half_of_mha(size: str) -> None:
    mha = kv_cache_bytes_per_token(ModelConfig.from_preset(size, "mha"))
    mla = kv_cache_bytes_per_token(ModelConfig.from_preset(size, "moe-mla-rope", kv_compression=0.5))
    assert mla * 2 == mha
    cache = KVCache(ModelConfig.from_preset(size, "mla", n_layers=1), batch_size=1, max_len=4)
    mha_cache = KVCache(ModelConfig.from_preset(size, "mha", n_layers=1), batch_size=1, max_len=4)
    assert cache.nbytes * 2 == mha_cache.nbytes


def test_unknown_dtype_is_named() -> None:
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        kv_cache_bytes_per_token(ModelConfig(), "fp8")
