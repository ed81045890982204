"""The CPU dropout path: same distribution and expectation as PyTorch's, same attention math, replayable."""

import pytest
import torch
import torch.nn.functional as F

from moemla import ModelConfig, Transformer
from moemla.model.dropout import Dropout, causal_attention_dropout, dropout, keep_mask

from .conftest import ALL_VARIANTS


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9])
def test_keep_mask_keeps_each_element_with_probability_one_minus_p(p: float) -> None:
    torch.manual_seed(0)
    mask = keep_mask((1000, 1003), p)  # odd size: the last 64-bit draw is only partly used
    n = mask.numel()
    sd = (p * (1 - p) / n) ** 0.5
    assert mask.shape == (1000, 1003) and mask.dtype == torch.bool
    assert abs(mask.float().mean().item() - (1 - p)) <= 5 * sd + 2**-16
    # the four 15-bit uniforms of one draw are independent: neighbours agree no more than chance says
    if 0 < p < 1:
        pairs = mask.flatten()[: n - n % 4].view(-1, 4)
        both_dropped = (~pairs[:, 0] & ~pairs[:, 3]).float().mean().item()
        assert abs(both_dropped - p * p) <= 5 * (p * p / (n / 4)) ** 0.5


def test_masks_replay_from_the_seed_and_differ_without_it() -> None:
    torch.manual_seed(7)
    a = keep_mask((64, 64), 0.1)
    torch.manual_seed(7)
    b = keep_mask((64, 64), 0.1)
    c = keep_mask((64, 64), 0.1)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_dropout_is_the_identity_in_eval_and_keeps_the_expectation_in_training() -> None:
    torch.manual_seed(0)
    x = torch.randn(200, 300)
    assert dropout(x, 0.1, training=False) is x or torch.equal(dropout(x, 0.1, training=False), x)
    assert torch.equal(dropout(x, 0.0), x)
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))
    y = dropout(torch.ones(400, 500), 0.25)
    kept = y != 0
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.75))  # survivors rescaled by 1/(1-p)
    assert abs(y.mean().item() - 1.0) < 0.01
    x.requires_grad_(True)
    out = dropout(x, 0.3)
    out.sum().backward()
    assert torch.equal(x.grad != 0, out != 0)  # gradient flows exactly through the kept elements


def test_dropout_module_matches_nn_dropout_in_shape_of_use() -> None:
    m = Dropout(0.2)
    assert "p=0.2" in repr(m) and not list(m.parameters())
    m.eval()
    x = torch.randn(3, 4)
    assert torch.equal(m(x), x)
    with pytest.raises(ValueError, match="dropout must be in"):
        Dropout(1.5)


def _qkv(seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, 3, 17, 8, generator=g, requires_grad=True) for _ in range(3))


def test_attention_with_dropout_zero_is_sdpa_causal_forward_and_backward() -> None:
    q, k, v = _qkv()
    ours = causal_attention_dropout(q, k, v, 0.0)
    grads = torch.autograd.grad(ours.square().sum(), (q, k, v))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    assert (ours - ref).abs().max().item() < 1e-5
    for a, b in zip(grads, ref_grads, strict=True):
        assert (a - b).abs().max().item() < 1e-4


def test_attention_with_dropout_is_causal_and_unbiased() -> None:
    q, k, v = _qkv(1)
    torch.manual_seed(0)
    mean = torch.stack([causal_attention_dropout(q, k, v, 0.3) for _ in range(3000)]).mean(0).detach()
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True).detach()
    assert (mean - ref).abs().max().item() < 0.15  # 3000 draws of a 0.3 dropout: a few % of |v| ~ 1
    assert (mean - ref).abs().mean().item() < 0.02
    v2 = v.detach().clone()
    v2[:, :, 9:] += 100.0  # the future cannot leak into queries 0..8 whatever the mask
    torch.manual_seed(1)
    a = causal_attention_dropout(q, k, v, 0.3)
    torch.manual_seed(1)
    b = causal_attention_dropout(q, k, v2, 0.3)
    assert torch.equal(a[:, :, :9], b[:, :, :9])


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_a_training_forward_replays_from_the_seed_on_the_cpu(variant: str) -> None:
    cfg = ModelConfig.from_preset("debug", variant, dropout=0.1)
    model = Transformer(cfg).train()
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    torch.manual_seed(3)
    a, _ = model(idx)
    torch.manual_seed(3)
    b, _ = model(idx)
    c, _ = model(idx)
    assert torch.equal(a, b) and not torch.equal(a, c)
    model.eval()
    with torch.no_grad():
        d, _ = model(idx)
        e, _ = model(idx)
    assert torch.equal(d, e)
