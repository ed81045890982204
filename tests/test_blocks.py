"""The block's switches (issue 43): norm, ffn_activation, latent, scoring, each alone and together as the deepseek
flavor, hold every model invariant across all ten variants; the accounting follows them; the engines that do not
implement a switch refuse it in one line before any work; --flavor names the set."""

import json

import pytest
import torch

from moemla import KVCache, Transformer, accounting
from moemla.cli import main
from moemla.config import VARIANTS, ConfigError, ModelConfig, check_portable, flavor_name
from moemla.model.kv_cache import cache_spec

from .conftest import BLOCKS, build

CASES = [pytest.param(v, b, id=f"{v}-{b}") for v in VARIANTS for b in BLOCKS]


def _model(variant: str, block: str) -> Transformer:
    model = build(variant, **BLOCKS[block])
    with torch.no_grad():  # weights and routing biases away from their init: every term of the math counts
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for moe in model.moe_layers():
            moe.router.bias.normal_(0.0, 0.05)
    return model


@pytest.mark.parametrize(("variant", "block"), CASES)
def test_every_block_switch_keeps_causality_and_cached_decoding_exact(variant: str, block: str) -> None:
    model, t = _model(variant, block), 20
    idx = torch.randint(0, model.cfg.vocab_size, (2, t))
    changed = idx.clone()
    changed[:, 11] = (idx[:, 11] + 1) % model.cfg.vocab_size
    with torch.no_grad():
        full, _ = model(idx)
        assert torch.allclose(full[:, :11], model(changed)[0][:, :11], atol=1e-6), "a future token changed the past"
        for absorbed in (True, False):  # MLA's one-token steps over the latents, and re-expanded
            cache = KVCache(model.cfg, batch_size=2, max_len=t, absorbed=absorbed)
            out = [model(idx[:, :7], cache=cache)[0], model(idx[:, 7:10], cache=cache)[0]]
            out += [model(idx[:, i : i + 1], cache=cache)[0] for i in range(10, t)]
            assert (torch.cat(out, dim=1) - full).abs().max().item() <= 1e-4


@pytest.mark.parametrize(("variant", "block"), CASES)
def test_accounting_follows_every_block_switch(variant: str, block: str) -> None:
    for bias in (True, False):
        cfg = ModelConfig.from_preset("debug", variant, **{"bias": bias, **BLOCKS[block]})
        model = Transformer(cfg)
        assert sum(p.numel() for p in model.parameters()) == accounting.total_params(cfg)
        cache = KVCache(cfg, batch_size=1, max_len=4)
        assert cache.nbytes == 4 * accounting.kv_cache_bytes_per_token(cfg)


def test_the_joint_latent_halves_mlas_cache_and_the_rope_key_stays() -> None:
    paper = ModelConfig.from_preset("xs", "moe-mla-drope")
    deepseek = ModelConfig.from_preset("xs", "moe-mla-drope", "deepseek")
    r, p = paper.kv_lora_rank, paper.rope_dim
    assert cache_spec(paper) == {"c_k": (r,), "c_v": (r,), "k_pe": (p,)}
    assert cache_spec(deepseek) == {"c_kv": (r,), "k_pe": (p,)}
    assert accounting.kv_cache_bytes_per_token(deepseek) == 4 * paper.n_layers * (r + p)


def test_swiglu_keeps_the_ffn_parameters_of_gelu() -> None:
    """Matching keeps the paper's rule in parameters: SwiGLU's FFNs are 2/3 as wide (three matrices), to a multiple
    of 8 (16-byte rows for grouped matmuls), so at xs the FFN parameters stay within 2% of GELU's."""
    for variant in ("mha", "moe-mla-rope"):
        gelu = ModelConfig.from_preset("xs", variant)
        swiglu = gelu.replace(ffn_activation="swiglu")
        assert abs(accounting.ffn_params(swiglu) / accounting.ffn_params(gelu) - 1) < 0.02
        assert swiglu.expert_inter_dim % 8 == 0 and swiglu.dense_inter_dim % 8 == 0


def test_sigmoid_scores_select_with_the_bias_and_weight_without_it() -> None:
    model = _model("moe-mla-drope", "deepseek")
    router = model.moe_layers()[0].router
    x = torch.randn(5, model.cfg.dim)
    gates, idx = router(x)
    scores = torch.sigmoid(x @ router.weight.T)
    assert torch.equal(idx, (scores + router.bias).topk(router.top_k).indices)
    torch.testing.assert_close(gates, scores.gather(-1, idx) / scores.gather(-1, idx).sum(-1, keepdim=True))


def test_flavors_are_named_sets_of_switches() -> None:
    assert flavor_name(ModelConfig()) == "paper"
    cfg = ModelConfig.from_preset("debug", "moe-mla-drope", "deepseek")
    assert flavor_name(cfg) == "deepseek" and not cfg.bias and not cfg.bias_in_gate
    assert flavor_name(cfg.replace(norm="layernorm")) is None
    with pytest.raises(ConfigError, match="unknown flavor"):
        ModelConfig.from_preset("debug", "mha", "llama")
    with pytest.raises(ConfigError, match="norm='batchnorm' is not one of"):
        ModelConfig(norm="batchnorm")


def test_info_prints_the_flavor(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--preset", "xs", "--variant", "moe-mla-drope", "--flavor", "deepseek", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert (row["flavor"], row["norm"], row["ffn_activation"], row["latent"], row["scoring"]) == (
        "deepseek", "rmsnorm", "swiglu", "joint", "sigmoid")  # fmt: skip
    assert main(["info", "--preset", "xs", "--flavor", "deepseek"]) == 0
    assert "deepseek block" in capsys.readouterr().out


@pytest.mark.parametrize("block", list(BLOCKS))
def test_the_cpu_engine_runs_every_switch_and_auto_picks_it(block: str) -> None:
    """The numpy/numba engine implements each switch (its logits: tests/test_numpy_decoder.py); the remote code,
    which does not, refuses in one line."""
    from moemla.inference.decoder import make_decoder

    model = _model("moe-mla-drope", block)
    assert type(make_decoder(model, engine="auto")).__name__ == "NumpyDecoder"
    with pytest.raises(ConfigError, match=r"remote code does not implement ModelConfig\.\w+"):
        check_portable(model.cfg, "the remote code", "use the native export")


def test_train_with_the_deepseek_flavor_and_resume_it(trained_debug_run, tmp_path, capsys) -> None:
    data = json.loads((trained_debug_run / "run.json").read_text())["data"]["path"]
    out = tmp_path / "ds"
    argv = ["train", "--data", data, "--out", str(out), "--preset", "debug", "--variant", "moe-mla-drope",
            "--flavor", "deepseek", "--max-steps", "2", "--batch-size", "2", "--micro-batch-size", "2",
            "--seq-len", "32"]  # fmt: skip
    assert main(argv) == 0
    meta = json.loads((out / "run.json").read_text())
    assert flavor_name(ModelConfig.from_dict(meta["model"])) == "deepseek"
    assert main([*argv[:-10], "--resume", "--max-steps", "3", *argv[-6:]]) == 0  # the run's own flavor goes on
    capsys.readouterr()
    assert main([*argv[:9], "--flavor", "paper", "--resume", "--max-steps", "4"]) == 1
    assert "norm" in capsys.readouterr().err
