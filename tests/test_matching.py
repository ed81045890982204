import pytest

from moemla import accounting
from moemla.config import SIZES, VARIANTS, ConfigError, ModelConfig
from moemla.experiments.matching import match, measure

SIZES_TO_MATCH = [s for s in SIZES if s != "debug"]


@pytest.mark.parametrize("size", SIZES_TO_MATCH)
@pytest.mark.parametrize("target", ["params", "flops"])
def test_every_variant_matches_dense_mha_within_2_percent(size: str, target: str) -> None:
    reference = ModelConfig.from_preset(size, "mha")
    for variant in VARIANTS:
        m = match(reference, ModelConfig.from_preset(size, variant), target)  # type: ignore[arg-type]
        assert abs(m.ratio - 1) <= 0.02, (variant, m.ratio)
        assert m.value == measure(m.cfg, target)  # type: ignore[arg-type]
        assert m.cfg.attention == ModelConfig.from_preset(size, variant).attention  # the variant stays itself


def test_matching_keeps_a_shape_that_already_matches() -> None:
    reference = ModelConfig.from_preset("xs", "mha")
    assert match(reference, reference, "params").cfg == reference
    mla = ModelConfig.from_preset("xs", "mla-rope")  # 0.7% fewer parameters: already within 2%
    assert match(reference, mla, "params").cfg == mla


def test_flop_matched_moe_spends_the_dense_budget_on_experts() -> None:
    reference = ModelConfig.from_preset("m", "mha")
    m = match(reference, ModelConfig.from_preset("m", "moe-mla-rope"), "flops")
    assert m.cfg.expert_inter_dim < ModelConfig.from_preset("m", "moe-mla-rope").expert_inter_dim
    assert accounting.total_params(m.cfg) > accounting.total_params(reference)  # more total, same compute


def test_impossible_tolerance_is_a_clear_error() -> None:
    reference = ModelConfig.from_preset("xs", "mha")
    with pytest.raises(ConfigError, match="within 0%"):
        match(reference, ModelConfig.from_preset("xs", "mla"), "params", tol=0.0)
