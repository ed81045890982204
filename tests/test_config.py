import pytest

from moemla import ModelConfig
from moemla.accounting import total_params
from moemla.config import SIZES, VARIANTS, ConfigError, variant_name


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(dim=100, n_heads=8), "not divisible by n_heads"),
        (dict(n_activated_experts=63), "must be between 1 and n_routed_experts"),
        (dict(n_activated_experts=0), "must be between 1 and n_routed_experts"),
        (dict(kv_compression=0.0), "kv_compression"),
        (dict(kv_compression=-0.5), "kv_compression"),
        (dict(kv_compression=1.5), "kv_compression"),
        (dict(dropout=1.0), "dropout"),
        (dict(attention="gqa"), "attention='gqa' is not one of"),
        (dict(positions="alibi"), "positions"),
        (dict(ffn="swiglu"), "ffn"),
        (dict(balance_rule="loss"), "balance_rule"),
        (dict(dim=0), "dim must be a positive integer"),
        (dict(vocab_size=-3), "vocab_size must be a positive integer"),
        (dict(dim=24, n_heads=8, positions="rope"), "head_dim=3 must be even"),
        (dict(n_routed_experts=0), "n_routed_experts"),
        (dict(balance_rate=-1.0), "balance_rate"),
        (dict(moe_inter_dim=0), "moe_inter_dim"),
    ],
)
def test_invalid_configs_raise_clear_errors(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_preset("xs", "moe-mla-rope", **overrides)


def test_unknown_presets_and_keys_are_named() -> None:
    with pytest.raises(ConfigError, match="unknown size preset 'xxl'"):
        ModelConfig.from_preset("xxl", "mha")
    with pytest.raises(ConfigError, match="unknown variant 'moe-gqa'"):
        ModelConfig.from_preset("xs", "moe-gqa")
    with pytest.raises(ConfigError, match=r"unknown model config keys \['hidden'\]"):
        ModelConfig.from_dict({"hidden": 3})


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variants_are_independent_choices(variant: str) -> None:
    cfg = ModelConfig.from_preset("xs", variant)
    assert variant_name(cfg) == variant
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


# Table 1: parameters of the dense MHA model at each size (vocab 50,257, max sequence 512)
TABLE1 = {"xs": 17.5e6, "s": 44.5e6, "m": 54.1e6, "l": 123.3e6, "xl": 202.7e6}


@pytest.mark.parametrize("size", list(TABLE1))
def test_table1_parameter_counts_within_1_5_percent(size: str) -> None:
    n = total_params(ModelConfig.from_preset(size, "mha"))
    assert abs(n / TABLE1[size] - 1) <= 0.015, f"{size}: {n / 1e6:.2f}M vs Table 1's {TABLE1[size] / 1e6}M"


def test_tiny_keeps_the_papers_expert_layout() -> None:
    cfg = ModelConfig.from_preset("tiny", "moe-mla-rope")
    assert (cfg.n_shared_experts, cfg.n_routed_experts, cfg.n_activated_experts) == (2, 62, 6)
    assert cfg.expert_inter_dim == cfg.dim  # d_ff / 4 with d_ff = 4d
    assert set(SIZES) >= {"debug", "tiny", "xs", "s", "m", "l", "xl"}
