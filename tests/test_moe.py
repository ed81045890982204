import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import moemla.model.moe as moe_module
from moemla import ModelConfig
from moemla.experiments.balancing import run_balancing, skewed_router
from moemla.model.moe import MoE, Router, balance_delta, load_cv

from .conftest import ALL_VARIANTS, build


def make_moe(**overrides: object) -> MoE:
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("debug", "moe-mla-rope", dropout=0.0, **overrides)
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return moe


def reference_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token: shared experts plus each selected routed expert, weighted by its gate."""
    gates, idx = moe.router(x)
    w1, w2 = moe.experts.w1, moe.experts.w2
    rows = []
    for n in range(x.shape[0]):
        y = moe.shared(x[n]) if moe.shared is not None else torch.zeros_like(x[n])
        for j in range(idx.shape[1]):
            e = idx[n, j]
            y = y + gates[n, j] * (F.gelu(x[n] @ w1[e]) @ w2[e])
        rows.append(y)
    return torch.stack(rows)


@pytest.fixture(params=["grouped_mm", "fallback"])
def dispatch(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "fallback":
        monkeypatch.setattr(moe_module, "grouped_mm_supported", lambda a, b: False)
    elif not moe_module.grouped_mm_supported(torch.ones(1, 32), torch.ones(1, 32, 32)):
        pytest.skip("torch._grouped_mm is not available in this torch build")
    return request.param


@pytest.mark.parametrize("overrides", [dict(), dict(bias_in_gate=False), dict(n_shared_experts=0)], ids=str)
def test_grouped_dispatch_equals_per_token_reference(dispatch: str, overrides: dict) -> None:
    moe = make_moe(**overrides)
    assert_equals_reference(moe, torch.randn(37, moe.router.weight.shape[1], requires_grad=True))


def assert_equals_reference(moe: MoE, x: torch.Tensor) -> None:
    """moe's output and every gradient (input, weights) equal the token-by-token reference's."""
    upstream = torch.randn(x.shape[0], x.shape[1])
    out = moe(x[None])[0]
    grads = torch.autograd.grad((out * upstream).sum(), [x, *moe.parameters()])
    ref = reference_moe(moe, x)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), [x, *moe.parameters()])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bias_in_gate", [True, False])
def test_each_token_uses_exactly_shared_plus_top_k_experts(bias_in_gate: bool) -> None:
    moe = make_moe(bias_in_gate=bias_in_gate, n_routed_experts=62, n_activated_experts=6)
    moe.router.bias.copy_(torch.randn(62))
    x = torch.randn(50, moe.router.weight.shape[1])
    gates, idx = moe.router(x)
    assert idx.shape == (50, 6)
    assert all(len(set(row.tolist())) == 6 for row in idx)
    assert (gates > 0).all()
    torch.testing.assert_close(gates.sum(-1), torch.ones(50))
    # backprop one token: exactly k routed experts (and the shared ones) receive a gradient
    out = moe(x[:1][None])
    out.square().sum().backward()
    touched = (moe.experts.w1.grad.abs().sum(dim=(1, 2)) > 0).sum().item()
    assert touched == 6
    assert moe.shared.w1.weight.grad.abs().sum() > 0
    assert moe.eval_load.sum() == 0 and moe.train_load.sum() == 6


def test_bias_changes_which_experts_not_gate_values_in_deepseek_mode() -> None:
    router = Router(ModelConfig.from_preset("debug", "moe-mla-rope", bias_in_gate=False))
    torch.nn.init.normal_(router.weight)
    x = torch.randn(8, router.weight.shape[1])
    scores = torch.softmax(x @ router.weight.T, dim=-1)
    router.bias[3] = 100.0  # force expert 3 into every selection
    gates, idx = router(x)
    assert (idx == 3).any(dim=-1).all()
    expected = scores.gather(-1, idx)
    torch.testing.assert_close(gates, expected / expected.sum(-1, keepdim=True))


@pytest.mark.parametrize(("rule", "rate"), [("paper", 2.0), ("sign", 0.01)])
def test_balancing_drives_cv_below_0_1_on_skewed_routing(rule: str, rate: float) -> None:
    moe, x = skewed_router()
    moe.train()
    assert run_balancing(moe, x, 1, rate, rule) > 0.5  # the first step sees the raw, skewed routing
    assert run_balancing(moe, x, 400, 0.0, rule) > 0.5  # without updates it stays skewed
    assert run_balancing(moe, x, 400, rate, rule) < 0.1


def test_balance_delta_rules() -> None:
    load = torch.tensor([10.0, 30.0, 20.0, 20.0])
    torch.testing.assert_close(balance_delta(load, 0.1, "sign"), torch.tensor([0.1, -0.1, 0.0, 0.0]))
    # Algorithm 1: f = [1/8, 3/8, 1/4, 1/4], target 1/4
    torch.testing.assert_close(balance_delta(load, 1.0, "paper"), torch.tensor([0.125, -0.125, 0.0, 0.0]))
    assert load_cv(torch.ones(5)) == 0.0
    assert load_cv(torch.tensor([0.0, 2.0])) == pytest.approx(1.0)


def test_recomputation_leaves_the_balancing_step_unchanged() -> None:
    # activation checkpointing runs the forward again in the backward pass and counts the routing again:
    # what balancing and the load CV read, each expert's share of the loads, must not change
    moe = make_moe()
    moe.train()
    x = torch.randn(1, 40, moe.router.weight.shape[1], requires_grad=True)
    moe(x).sum().backward()
    plain = moe.train_load.clone()
    moe.train_load.zero_()
    checkpoint(moe, x, use_reentrant=False).sum().backward()
    recomputed = moe.train_load.clone()
    assert plain.sum() == 40 * moe.router.top_k
    assert torch.equal(recomputed, 2 * plain)  # counted once more, uniformly
    for rule in ("paper", "sign"):
        torch.testing.assert_close(balance_delta(recomputed, 1e-2, rule), balance_delta(plain, 1e-2, rule))
    assert load_cv(recomputed) == pytest.approx(load_cv(plain))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_experts_run_in_the_autocast_dtype_with_fp32_master_weights(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    moe = make_moe()
    x = torch.randn(40, moe.router.weight.shape[1])  # fp32, as LayerNorm's output under autocast
    reference = moe(x)
    seen: list[tuple[torch.dtype, torch.dtype]] = []
    real = moe_module.grouped_mm

    def spy(a: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, tail: bool = False) -> torch.Tensor:
        seen.append((a.dtype, w.dtype))
        return real(a, w, counts, tail)

    monkeypatch.setattr(moe_module, "grouped_mm", spy)
    with torch.autocast("cpu", dtype=dtype):
        y = moe(x)
    assert seen == [(dtype, dtype)] * 2  # both projections, both operands
    scale = reference.abs().max()
    assert (y.float() - reference).abs().max() < 0.05 * scale  # within bf16 / fp16 rounding of fp32
    y.float().square().mean().backward()
    assert moe.experts.w1.dtype == torch.float32 and moe.experts.w1.grad.dtype == torch.float32


@pytest.mark.parametrize("amp", [None, torch.bfloat16])
@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_training_forward_compiles_without_graph_breaks(variant: str, amp: torch.dtype | None) -> None:
    import torch._dynamo

    model = build(variant).train()
    idx = torch.randint(0, model.cfg.vocab_size, (2, 17))

    def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
            return model(x, targets=y)[1]

    torch._dynamo.reset()
    explained = torch._dynamo.explain(loss)(idx[:, :-1], idx[:, 1:])
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]


@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_compiled_moe_matches_eager_forward_and_backward(amp: torch.dtype | None) -> None:
    moe = make_moe()
    x = torch.randn(40, moe.router.weight.shape[1], requires_grad=True)

    def run(fn: object) -> tuple[torch.Tensor, ...]:
        moe.zero_grad()
        x.grad = None
        with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
            y = fn(x)  # type: ignore[operator]
        (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        return y.detach().float(), x.grad.clone(), moe.experts.w1.grad.clone(), moe.experts.w2.grad.clone()

    eager = run(moe)
    torch._dynamo.reset()
    compiled = run(torch.compile(moe, backend="aot_eager", fullgraph=True))
    tol = 1e-5 if amp is None else 2e-2
    for a, b in zip(eager, compiled, strict=True):
        assert torch.allclose(a, b, atol=tol * a.abs().max(), rtol=0)
    assert int(moe.train_load.sum()) == 2 * 40 * moe.router.top_k  # counted once per forward, compiled too


def test_top_p_keeps_the_fewest_leading_experts_whose_mass_reaches_p() -> None:
    from moemla.model.moe import top_p

    gates = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25], [0.9, 0.05, 0.03, 0.02]])
    kept = (top_p(gates, 0.7, 1) > 0).sum(-1).tolist()
    assert kept == [2, 3, 1]  # 0.5 + 0.3 reaches 0.7; a flat token needs three; a confident one one
    assert (top_p(gates, 0.7, 2) > 0).sum(-1).tolist() == [2, 3, 2]  # at least min_k
    assert torch.equal(top_p(gates, 1.0, 1), gates)  # p = 1 keeps all K: top-k routing


@pytest.mark.parametrize("overrides", [dict(), dict(bias_in_gate=False)], ids=str)
def test_top_p_routing_equals_the_per_token_reference_and_counts_only_kept_experts(
    dispatch: str, overrides: dict
) -> None:
    """Dropped assignments sort past every expert's group: the grouped matmul leaves them out, and neither the
    output nor any gradient may pick up what the kernel left in those rows."""
    moe = make_moe(routing="top-p", routing_p=0.6, n_activated_experts=4, **overrides)
    moe.train()
    x = torch.randn(37, moe.router.weight.shape[1], requires_grad=True)
    gates, _ = moe.router(x)
    kept = (gates > 0).sum(-1)
    assert kept.min() >= 1 and kept.max() <= 4 and kept.float().mean() < 4  # a variable number per token
    torch.testing.assert_close(gates.sum(-1), torch.ones(37))
    assert_equals_reference(moe, x)
    assert int(moe.train_load.sum()) == int(kept.sum())


def test_top_p_routing_compiles_without_graph_breaks_and_decodes_from_the_cache() -> None:
    import torch._dynamo

    from moemla import KVCache
    from moemla.inference.torch_decoder import TorchDecoder

    model = build("moe-mla-rope", routing="top-p", routing_p=0.5)
    idx = torch.randint(0, model.cfg.vocab_size, (2, 17))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda x, y: model(x, targets=y)[1])(idx[:, :-1], idx[:, 1:])
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    with torch.no_grad():
        full = model(idx)[0]
        for gather in (False, True):  # one-token steps grouped, or gathering each assignment's experts
            cache = KVCache(model.cfg, 2, max_len=17, gather_experts=gather)
            steps = [model(idx[:, :9], cache=cache)[0]] + [
                model(idx[:, i : i + 1], cache=cache)[0] for i in range(9, 17)
            ]
            torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-4)
    dec = TorchDecoder(model)
    dec.prefill([idx[0, :9].tolist()])
    torch.testing.assert_close(dec.step([int(idx[0, 9])])[0], full[0, 9], atol=1e-4, rtol=1e-4)
