"""The Decoder interface: every engine behind it decodes the same, the CPU engine refuses what it does not know."""

import dataclasses
import importlib.util
import json

import numpy as np
import pytest
import torch

from moemla.config import ConfigError, ModelConfig
from moemla.inference.cpu.decoder import NumpyDecoder, check_supported
from moemla.inference.decoder import make_decoder
from moemla.inference.generate import generate_ids
from moemla.inference.sampling import greedy
from moemla.inference.torch_decoder import TorchDecoder

from .conftest import ALL_VARIANTS, build

ENGINES = ["torch", "numpy"] + (["numba"] if importlib.util.find_spec("numba") else [])


def _perturbed(variant: str) -> torch.nn.Module:
    model = build(variant)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_every_engine_decodes_the_same_greedy_tokens(variant: str) -> None:
    model = _perturbed(variant)
    prompt = torch.randint(0, model.cfg.vocab_size, (9,)).tolist()
    tokens = {e: generate_ids(make_decoder(model, e), prompt, greedy(12)) for e in ENGINES}
    assert len(set(tokens["torch"])) > 1
    assert all(t == tokens["torch"] for t in tokens.values()), tokens


@pytest.mark.parametrize("variant", ["mla-rope", "moe-mla-drope", "mla"])
def test_torch_decoder_chooses_absorbed_or_naive_mla_with_equal_logits(variant: str) -> None:
    model = _perturbed(variant)
    prompts = [[5, 9, 23, 40, 7], [17, 2, 60]]
    out = {}
    for absorbed in (True, False):
        dec = TorchDecoder(model, absorbed=absorbed)
        steps = [dec.prefill(prompts, 16)]
        steps += [dec.step([3, 4]) for _ in range(5)]
        assert dec.cache.absorbed is absorbed
        out[absorbed] = torch.stack(steps)
    torch.testing.assert_close(out[True], out[False], atol=1e-4, rtol=0)


def test_left_padded_prefill_equals_each_prompt_alone() -> None:
    model = _perturbed("moe-mla-rope")
    dec = TorchDecoder(model)
    both = dec.prefill([[5, 9, 23, 40, 7], [17, 2]])
    alone = TorchDecoder(model).prefill([[17, 2]])
    torch.testing.assert_close(both[1], alone[0], atol=1e-4, rtol=0)
    assert dec.length == 5 and dec.max_len == model.cfg.max_seq_len


def test_cpu_engine_refuses_config_fields_it_does_not_implement() -> None:
    @dataclasses.dataclass(frozen=True)
    class WithQkNorm(ModelConfig):
        qk_norm: str = "none"  # a field added to the model that the CPU engine has never heard of

    check_supported(WithQkNorm())  # at its default the field changes nothing
    with pytest.raises(ConfigError, match=r"does not implement ModelConfig.qk_norm='rms'; use --engine torch"):
        check_supported(WithQkNorm(qk_norm="rms"))
    model = build("mha")
    with pytest.raises(ConfigError, match="qk_norm"):
        NumpyDecoder(WithQkNorm(**{**model.cfg.to_dict(), "qk_norm": "rms"}), model.state_dict())


def test_make_decoder_refuses_what_an_engine_cannot_do() -> None:
    model = build("mha")
    with pytest.raises(ConfigError, match="one sequence at a time"):
        make_decoder(model, "numpy", batch_size=4)
    with pytest.raises(ConfigError, match="CPU engine"):
        make_decoder(model, "torch", quantize="int8")
    assert isinstance(make_decoder(model, "auto", batch_size=4), TorchDecoder)
    assert isinstance(make_decoder(model, "auto"), NumpyDecoder)
    with pytest.raises(ValueError, match="one sequence at a time"):
        make_decoder(model, "numpy").prefill([[1, 2], [3]])


def test_int8_rounds_each_weight_within_half_a_step_of_its_row() -> None:
    from moemla.inference.cpu.quant import to_int8

    w = torch.randn(3, 40, 64).numpy()  # (E, out, in): one scale per output row
    w[1, 7] = 0.0  # an all-zero row keeps a usable scale
    q, scale = to_int8(w)
    assert q.dtype == np.int8 and scale.shape == (3, 40)
    assert np.all(np.abs(w - q * scale[..., None]) <= scale[..., None] / 2 + 1e-7)
    assert np.abs(q).max() == 127


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_int8_engines_agree_and_hold_a_quarter_of_the_bytes(variant: str) -> None:
    model = _perturbed(variant)
    prompt = torch.randint(0, model.cfg.vocab_size, (9,)).tolist()
    fp32 = NumpyDecoder.from_model(model)
    engines = ["numpy", "numba"] if "numba" in ENGINES else ["numpy"]
    decs = {e: make_decoder(model, e, quantize="int8") for e in engines}
    assert all(d.wte_q.dtype == np.int8 and d.wte_t is None for d in decs.values())
    assert decs["numpy"].weight_nbytes < 0.4 * fp32.weight_nbytes
    if "numba" in decs:  # the compiled int8 kernels compute what the numpy int8 path computes
        a, b = decs["numpy"], decs["numba"]
        steps = [np.asarray(a.prefill([prompt])) - np.asarray(b.prefill([prompt]))]
        steps += [np.asarray(a.step([t])) - np.asarray(b.step([t])) for t in (3, 17, 42)]
        assert max(np.abs(s).max() for s in steps) < 1e-3
    tokens = {e: generate_ids(d, prompt, greedy(10)) for e, d in decs.items()}
    assert len({tuple(t) for t in tokens.values()}) == 1


def test_quantize_flag_on_generate_and_bench(trained_debug_run, capsys: pytest.CaptureFixture[str]) -> None:
    from moemla.cli import main

    run = str(trained_debug_run)
    assert main(["generate", run, "--engine", "numpy", "--quantize", "int8", "--max-new-tokens", "5"]) == 0
    assert main(["generate", run, "--engine", "torch", "--quantize", "int8", "--max-new-tokens", "5"]) == 2
    assert "--quantize int8 is for the CPU engine" in capsys.readouterr().err
    argv = ["bench", "--preset", "debug", "--variants", "moe-mla-rope", "--engine", "numpy", "--quantize", "int8"]
    assert main([*argv, "--context", "32", "--new-tokens", "4", "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["quantize"] == "int8" and row["engine"] == "numpy" and row["decode_tokens_per_s"] > 0


def test_bench_memory_fits_the_largest_batch_whose_weights_and_cache_fit(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from moemla.cli import main
    from moemla.inference.bench import fit_batch

    cfg = ModelConfig.from_preset("debug", "moe-mla-rope")
    budget = 3 * 2**20
    batch, weights, per_seq = fit_batch(cfg, 64, "float32", budget)
    assert batch > 0 and weights + batch * per_seq <= budget < weights + (batch + 1) * per_seq
    argv = ["bench", "--preset", "debug", "--variants", "mha,moe-mla-rope", "--memory", str(budget / 2**30)]
    assert main([*argv, "--context", "64", "--new-tokens", "4", "--max-batch", "8", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    mha, moe = rows
    assert moe["fits_batch"] == batch and moe["batch"] == min(batch, 8)
    assert mha["cache_bytes_per_sequence"] == 2 * moe["cache_bytes_per_sequence"]  # MLA's half-size cache
    assert moe["peak_memory_bytes"] <= budget  # measured on the real tensors, at the measured batch
    assert main([*argv, "--context", "64", "--batch", "4"]) == 2


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_static_steps_decode_as_the_eager_ones(variant: str) -> None:
    """The fixed-shape step a CUDA graph captures (device write slot, full-length masked attention, a reused
    bucket cache with dummy rows) gives the eager decoder's logits, batch after batch."""
    model = _perturbed(variant)
    eager, static = TorchDecoder(model), TorchDecoder(model, mode="static")
    batches = ([[5, 9, 23, 40, 7], [17, 2, 60]], [[8, 1], [3, 3, 3, 3, 3, 3], [42]], [[4], [5, 6], [7], [8, 9, 10]],
               [[11, 12, 13]])  # fmt: skip
    for prompts in batches:
        got = [static.prefill(prompts, 24)]
        want = [eager.prefill(prompts, 24)]
        for i in range(6):
            tokens = [(7 * i + j) % model.cfg.vocab_size for j in range(len(prompts))]
            got.append(static.step(tokens))
            want.append(eager.step(tokens))
        assert static.cache.batch_size == 1 << (len(prompts) - 1).bit_length() and static.cache.max_len == 64
        torch.testing.assert_close(torch.stack(got), torch.stack(want), atol=1e-4, rtol=0)
    assert sorted(static._static) == [(1, 64), (2, 64), (4, 64)]  # 3 and 4 rows share the 4-row bucket
    tokens = generate_ids(TorchDecoder(model, mode="static"), [5, 9, 23], greedy(10))
    assert tokens == generate_ids(model, [5, 9, 23], greedy(10))


def _compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


# mla in the default run; the MoE variants' compiles take ~90 s each on 2 cold cores
@pytest.mark.parametrize(
    "variant", ["mla", *(pytest.param(v, marks=pytest.mark.slow) for v in ("moe-mla-rope", "moe-mla-drope"))]
)
def test_compiled_steps_compile_once_per_bucket_and_decode_as_the_eager_ones(variant: str) -> None:
    """The static step reads no Python int, so torch.compile traces it once per bucket with no graph break
    (fullgraph) and replays it at every later length and batch of that bucket, with the eager logits."""
    torch._dynamo.reset()
    model = _perturbed(variant)
    compiled, eager = TorchDecoder(model, compile=True), TorchDecoder(model)
    before = _compiled_graphs()
    for prompts in ([[5, 9, 23, 40, 7], [17, 2, 60]], [[8, 1], [3, 3, 3, 3]], [[4], [5, 6], [7]]):
        got, want = [compiled.prefill(prompts, 24)], [eager.prefill(prompts, 24)]
        for i in range(5):
            tokens = [(7 * i + j) % model.cfg.vocab_size for j in range(len(prompts))]
            got.append(compiled.step(tokens))
            want.append(eager.step(tokens))
        torch.testing.assert_close(torch.stack(got), torch.stack(want), atol=1e-4, rtol=0)
    # buckets (2, 64) and (4, 64), each traced once for all its lengths
    assert compiled.static and _compiled_graphs() - before == 2
    assert generate_ids(compiled, [5, 9, 23], greedy(8)) == generate_ids(model, [5, 9, 23], greedy(8))


def test_a_static_step_checks_the_room_left_in_its_bucket() -> None:
    dec = TorchDecoder(build("mha"), mode="static")
    dec.prefill([list(range(1, 64))], 64)
    dec.step([1])  # slot 63, the bucket's last
    with pytest.raises(ValueError, match="KV cache holds 64 tokens; 65 requested"):
        dec.step([2])


def test_compile_and_cuda_graph_choose_the_torch_engine() -> None:
    model = build("mha")
    assert isinstance(make_decoder(model, "auto", compile=True), TorchDecoder)
    with pytest.raises(ConfigError, match="drop them with --engine numpy"):
        make_decoder(model, "numpy", compile=True)


def test_cuda_graph_mode_needs_cuda_on_a_cpu_machine() -> None:
    model = build("mha")
    if torch.cuda.is_available():
        pytest.skip("CUDA present: test_cuda_graph_decode_equals_eager covers it")
    with pytest.raises(ConfigError, match="CUDA"):
        TorchDecoder(model, mode="cuda-graph")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compile", [False, True], ids=["graph", "compiled-graph"])
@pytest.mark.parametrize("variant", ["mha", "moe-mla-rope", "moe-mla-drope"])
def test_cuda_graph_decode_equals_eager(variant: str, compile: bool) -> None:
    model = _perturbed(variant).cuda()
    prompts = [[5, 9, 23, 40, 7], [17, 2, 60]]
    graph, eager = TorchDecoder(model, mode="cuda-graph", compile=compile), TorchDecoder(model)
    for _ in range(2):  # the second batch replays the graph captured during the first
        got, want = [graph.prefill(prompts, 32)], [eager.prefill(prompts, 32)]
        for i in range(8):
            got.append(graph.step([i, i + 1]))
            want.append(eager.step([i, i + 1]))
        torch.testing.assert_close(torch.stack(got), torch.stack(want), atol=1e-3, rtol=1e-3)


def test_a_step_that_fails_to_compile_decodes_uncompiled_with_one_message(monkeypatch, capsys) -> None:
    def broken_compile(fn, **options):  # what a machine without a C compiler gives at the first call
        def run(*args):
            raise RuntimeError("InductorError: no working C++ compiler found\nlong details")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    model = _perturbed("moe-mla-rope")
    dec = TorchDecoder(model, compile=True)
    tokens = generate_ids(dec, [5, 9, 23], greedy(6))
    assert tokens == generate_ids(model, [5, 9, 23], greedy(6))
    err = capsys.readouterr().err
    assert err.count("torch.compile is unavailable") == 1 and "no working C++ compiler" in err and "--compile" in err


@pytest.mark.parametrize("engine", ENGINES)
def test_every_engine_returns_torch_logits_and_declares_its_bytes(engine: str) -> None:
    """The Decoder interface has one return type and declares what callers use: no caller converts or branches."""
    model = build("moe-mla-rope")
    dec = make_decoder(model, engine)
    first, second = dec.prefill([[5, 9, 23]]), dec.step([4])
    assert isinstance(first, torch.Tensor) and first.shape == second.shape == (1, model.cfg.vocab_size)
    assert dec.cache_nbytes > 0 and dec.weight_nbytes > 0
