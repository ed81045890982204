"""Every engine that runs a model is held to the torch model, for all ten variants in both blocks (the paper's and
DeepSeek-V3's): the logits of a padded prefill and of 64 cached steps within 1e-4, and the same greedy tokens
through the one decode loop.

Here: the torch decoder (absorbed and re-expanded MLA steps, a left-padded batch of two prompts) and the CPU engine
(numpy and numba, one sequence). The exported engines hold the same invariants in their own files, since each
needs an export first: ONNX Runtime in tests/test_onnx.py (one graph of each shape in the default run, every
variant and block with -m slow: an MLA graph takes ~15 s to trace), llama.cpp in tests/test_llamacpp.py (the
DeepSeek block's architectures it runs)."""

import importlib.util

import pytest
import torch

from moemla.config import FLAVORS, VARIANTS
from moemla.inference.cpu.decoder import NumpyDecoder
from moemla.inference.generate import generate_ids, generate_ids_batch
from moemla.inference.sampling import greedy
from moemla.inference.torch_decoder import TorchDecoder

from .conftest import build

STEPS = 64
PROMPTS = ([5, 17, 3, 99, 42, 8, 61, 7, 23, 250, 11, 4, 90], [31, 2, 77, 140, 9, 66, 12])  # 13 and 7 tokens
CASES = [pytest.param(v, f, id=f"{v}-{f}") for f in FLAVORS for v in VARIANTS]
ENGINES = ["torch", "torch-naive", "numpy", "numba"]


def _model(variant: str, flavor: str) -> torch.nn.Module:
    """A debug model with room for the prompts and 64 steps, weights and routing biases far from their init (every
    term of the math counts, and greedy choices are not near-ties)."""
    model = build(variant, max_seq_len=96, **FLAVORS[flavor])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.4 * torch.randn_like(p))
        for moe in model.moe_layers():
            moe.router.bias.normal_(0.0, 0.05)
    return model


def _decoder(model: torch.nn.Module, engine: str) -> object:
    if engine.startswith("torch"):
        return TorchDecoder(model, absorbed=engine == "torch")
    if engine == "numba" and importlib.util.find_spec("numba") is None:
        pytest.skip("the compiled kernels need numba (pip install 'moemla[fast]')")
    return NumpyDecoder.from_model(model, compiled=engine == "numba")


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(("variant", "flavor"), CASES)
def test_every_engine_equals_the_model_over_a_padded_prefill_and_64_cached_steps(
    variant: str, flavor: str, engine: str
) -> None:
    model = _model(variant, flavor)
    dec = _decoder(model, engine)
    prompts = list(PROMPTS) if dec.max_batch is None else [PROMPTS[0]]  # the CPU engine: one sequence
    steps = torch.randint(0, model.cfg.vocab_size, (STEPS, len(prompts)), generator=torch.Generator().manual_seed(1))
    got = [dec.prefill(prompts)] + [dec.step(s.tolist()) for s in steps]  # (B, V) each
    for i, prompt in enumerate(prompts):
        with torch.no_grad():
            want = model(torch.tensor([prompt + steps[:, i].tolist()]))[0][0]  # (T, V), no cache
        rows = torch.stack([logits[i] for logits in got])  # (1 + STEPS, V)
        err = (rows - want[len(prompt) - 1 :]).abs().max().item()
        assert err <= 1e-4, f"{engine}: prompt {i} drifts by {err:.2e} from the model"
    want_tokens = [generate_ids(model, p, greedy(STEPS)) for p in prompts]
    assert len({t for row in want_tokens for t in row}) > 5, "a model this perturbed should not repeat one token"
    if dec.max_batch is None:
        assert generate_ids_batch(dec, prompts, greedy(STEPS)) == want_tokens
    else:
        assert [generate_ids(dec, p, greedy(STEPS)) for p in prompts] == want_tokens
