import pytest
import torch

from moemla import KVCache, ModelConfig, Transformer
from moemla.model.rope import apply_rope, rope_tables

from .conftest import ALL_VARIANTS, build


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_causality(variant: str) -> None:
    model, t, j = build(variant), 20, 11
    idx = torch.randint(0, model.cfg.vocab_size, (2, t))
    changed = idx.clone()
    changed[:, j] = (idx[:, j] + 1) % model.cfg.vocab_size
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    assert torch.allclose(a[:, :j], b[:, :j], atol=1e-6), "a future token changed the past"
    assert not torch.allclose(a[:, j:], b[:, j:], atol=1e-6)


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_cached_decode_equals_full_forward(variant: str) -> None:
    model, t = build(variant), 24
    idx = torch.randint(0, model.cfg.vocab_size, (3, t))
    with torch.no_grad():
        full, _ = model(idx)
        cache = KVCache(model.cfg, batch_size=3, max_len=t)
        prefill, _ = model(idx[:, :9], cache=cache)  # a prompt, a chunk after it, then token by token
        chunk, _ = model(idx[:, 9:13], cache=cache)
        steps = [model(idx[:, i : i + 1], cache=cache)[0] for i in range(13, t)]
    cached = torch.cat([prefill, chunk, *steps], dim=1)
    assert cache.length == t
    assert (cached - full).abs().max().item() <= 1e-4


@pytest.mark.parametrize("variant", ALL_VARIANTS)
@pytest.mark.parametrize("pad", [None, [0, 3]])
def test_a_caller_counting_filled_slots_reads_only_those_with_the_same_logits(variant: str, pad: list | None) -> None:
    """`filled` (the caller's count) shrinks what attention reads, and drops the mask where nothing is padded:
    the logits equal those of the masked read over every slot, for a prompt, a chunk and single steps."""
    model, t = build(variant), 20
    idx = torch.randint(1, model.cfg.vocab_size, (2, t))
    out = {}
    for counted in (False, True):
        cache = KVCache(model.cfg, batch_size=2, max_len=32, pad=pad)
        ends = [6, 10, *range(11, t + 1)]  # a prompt, a chunk after it, then token by token
        with torch.no_grad():
            logits = [model(idx[:, a:b], cache=cache, filled=b if counted else None)[0]
                      for a, b in zip([0, *ends], ends, strict=False)]  # fmt: skip
        out[counted] = torch.cat(logits, dim=1)
        assert cache.length == t
    torch.testing.assert_close(out[True], out[False], atol=1e-5, rtol=1e-5)


MLA_VARIANTS = [v for v in ALL_VARIANTS if ModelConfig.from_preset("debug", v).attention == "mla"]


@pytest.mark.parametrize("variant", MLA_VARIANTS)
def test_absorbed_decode_equals_naive_decode(variant: str) -> None:
    # trained-looking weights: biases non-zero, so the absorbed bias terms are exercised too
    model, t = build(variant), 30
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    idx = torch.randint(0, model.cfg.vocab_size, (2, t))
    logits = {}
    for absorbed in (True, False):
        cache = KVCache(model.cfg, batch_size=2, max_len=t, absorbed=absorbed)
        with torch.no_grad():
            out = [model(idx[:, :5], cache=cache)[0]]
            out += [model(idx[:, i : i + 1], cache=cache)[0] for i in range(5, t)]
        logits[absorbed] = torch.cat(out, dim=1)
    assert (logits[True] - logits[False]).abs().max().item() <= 1e-4


def test_decoupled_rope_caches_latents_plus_one_shared_key() -> None:
    cfg = ModelConfig.from_preset("xs", "moe-mla-drope")
    assert cfg.rope_dim == cfg.head_dim // 2
    cache = KVCache(cfg, batch_size=1, max_len=8)
    assert cache.bytes_per_token == cfg.n_layers * (2 * cfg.kv_lora_rank + cfg.rope_dim) * 4
    with pytest.raises(ValueError, match="decoupled' needs attention='mla'"):
        ModelConfig.from_preset("xs", "mha", rope_mode="decoupled")


def test_rope_depends_only_on_relative_position() -> None:
    d = 16
    cos, sin = rope_tables(d, 64)
    q, k = torch.randn(1, 1, 1, d), torch.randn(1, 1, 1, d)

    def score(m: int, n: int) -> float:
        qm = apply_rope(q, cos[m : m + 1], sin[m : m + 1])
        kn = apply_rope(k, cos[n : n + 1], sin[n : n + 1])
        return float((qm * kn).sum())

    for offset in (1, 5, 20):
        assert score(3, 3 + offset) == pytest.approx(score(30, 30 + offset), abs=1e-5)
    assert score(0, 0) == pytest.approx(float((q * k).sum()), abs=1e-6)  # position 0: no rotation
    assert score(3, 8) != pytest.approx(score(3, 9), abs=1e-3)


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_debug_model_overfits_one_batch(variant: str) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("debug", variant, dropout=0.0)
    model = Transformer(cfg)
    idx = torch.randint(0, cfg.vocab_size, (4, 17))
    x, y = idx[:, :-1], idx[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        _, loss = model(x, y)
        first = first or loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.routing_bias_step()
    assert first > 5.0
    assert loss.item() < 0.1, f"{variant}: loss {first:.2f} -> {loss.item():.3f}"


def test_context_overflow_is_a_clear_error() -> None:
    model = build("moe-mla-rope")
    too_long = torch.zeros(1, model.cfg.max_seq_len + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        model(too_long)
    cache = KVCache(model.cfg, batch_size=1, max_len=4)
    with pytest.raises(ValueError, match="KV cache holds 4 tokens"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)


def test_router_bias_travels_with_the_state_dict() -> None:
    model = build("moe-mla-rope")
    model.moe_layers()[0].router.bias.fill_(0.25)
    clone = Transformer(model.cfg)
    clone.load_state_dict(model.state_dict())
    assert torch.equal(clone.moe_layers()[0].router.bias, model.moe_layers()[0].router.bias)
