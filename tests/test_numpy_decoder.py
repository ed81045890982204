import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from moemla.cli import main
from moemla.inference.cpu.decoder import NumpyDecoder
from moemla.inference.generate import generate_ids
from moemla.inference.sampling import greedy
from moemla.model import KVCache

from .conftest import ALL_VARIANTS, BLOCKS, build


def perturbed(variant: str, **overrides: object) -> torch.nn.Module:
    """A debug model whose biases and routing biases are not zero, so every term of the math is exercised."""
    model = build(variant, **overrides)
    with torch.no_grad():
        for name, t in model.named_parameters():
            if name.endswith("bias"):
                t.normal_(std=0.1)
        for moe in model.moe_layers():
            moe.router.bias.normal_(std=0.5)
    return model


def needs_numba(compiled: bool) -> None:
    if compiled:
        pytest.importorskip("numba", reason="the compiled kernels need numba (pip install 'moemla[fast]')")


@pytest.mark.parametrize("compiled", [False, True], ids=["numpy", "numba"])
@pytest.mark.parametrize("variant", ALL_VARIANTS)
@pytest.mark.parametrize(
    "overrides", [{}, {"bias": False, "bias_in_gate": False}, *BLOCKS.values()], ids=["bias", "nobias", *BLOCKS]
)
def test_numpy_logits_equal_torch_for_prefill_decode_and_chunks(variant: str, overrides: dict, compiled: bool) -> None:
    needs_numba(compiled)
    model = perturbed(variant, **overrides)
    ids = torch.randint(0, model.cfg.vocab_size, (1, 20))
    with torch.no_grad():
        expected = model(ids)[0][0].numpy()  # (20, V), no cache
    dec = NumpyDecoder.from_model(model, compiled=compiled)
    got = [dec.forward(ids[0, :9].tolist(), all_logits=True)]  # prefill
    got += [dec.forward([int(t)], all_logits=True) for t in ids[0, 9:15]]  # one token per step
    got.append(dec.forward(ids[0, 15:].tolist(), all_logits=True))  # a chunk after a cached prefix
    np.testing.assert_allclose(np.concatenate(got), expected, atol=1e-4, rtol=1e-4)
    assert dec.length == 20


@pytest.mark.parametrize("compiled", [False, True], ids=["numpy", "numba"])
@pytest.mark.parametrize("variant", ["mha", "moe-mla-rope", "moe-mla-drope"])
def test_greedy_numpy_equals_greedy_torch(variant: str, compiled: bool) -> None:
    needs_numba(compiled)
    model = perturbed(variant)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    want = generate_ids(model, prompt, greedy(12))
    got = generate_ids(NumpyDecoder.from_model(model, compiled=compiled), prompt, greedy(12))
    assert got == want


def test_compiled_kernels_equal_numpy_on_long_contexts() -> None:
    """Every one-token kernel against the numpy path at many positions (the debug preset's whole context)."""
    needs_numba(True)
    model = perturbed("moe-mla-rope")
    plain, fast = NumpyDecoder.from_model(model), NumpyDecoder.from_model(model, compiled=True)
    plain.forward([1, 2]), fast.forward([1, 2])
    for t in range(model.cfg.max_seq_len - 2):
        np.testing.assert_allclose(fast.forward([t % 50]), plain.forward([t % 50]), atol=1e-4, rtol=1e-4)


def test_numba_without_a_cache_folder_is_a_clear_error() -> None:
    needs_numba(True)
    from numba.core import caching

    if not hasattr(caching.CacheImpl, "_locator_classes"):
        pytest.skip("this numba finds its cache folders differently")
    code = (
        "import numba.core.caching as c; c.CacheImpl._locator_classes = []\n"  # as if no folder were writable
        "from moemla.inference.cpu.decoder import load_kernels\n"
        "load_kernels()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert "ConfigError" in out.stderr and "set NUMBA_CACHE_DIR" in out.stderr


def test_missing_numba_is_a_clear_error(tmp_path) -> None:
    code = (
        "import sys; sys.modules['numba'] = None\n"  # any import of numba now fails
        "from moemla.cli import main\n"
        "sys.exit(main(['bench', '--preset', 'debug', '--variants', 'mha', '--context', '16', '--new-tokens', '2',"
        " '--engine', 'numba']))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 2, out.stderr
    assert "pip install 'moemla[fast]'" in out.stderr and "Traceback" not in out.stderr


def test_from_safetensors_needs_no_torch_model(tmp_path) -> None:
    model = perturbed("moe-mla-drope")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors")
    dec = NumpyDecoder.from_safetensors(model.cfg, str(tmp_path / "model.safetensors"))
    np.testing.assert_allclose(dec.forward([1, 2, 3]), NumpyDecoder.from_model(model).forward([1, 2, 3]), atol=0)


def test_bad_input_is_refused_clearly() -> None:
    dec = NumpyDecoder.from_model(build("mla"), max_len=8)
    with pytest.raises(ValueError, match="token ids must lie in"):
        dec.forward([dec.cfg.vocab_size])
    with pytest.raises(ValueError, match="exceed the decoder's cache of 8"):
        dec.forward(list(range(9)))
    with pytest.raises(ValueError, match="at least one"):
        dec.forward([])
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len"):
        NumpyDecoder.from_model(build("mla"), max_len=10_000)


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_numpy_cache_holds_the_same_bytes_as_the_torch_cache(variant: str) -> None:
    model = build(variant)
    dec = NumpyDecoder.from_model(model, max_len=16)
    assert dec.cache_nbytes == KVCache(model.cfg, 1, max_len=16).nbytes
    assert dec.weight_nbytes >= sum(p.numel() * 4 for p in model.parameters())


def test_bench_numpy_engine_json(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "--preset", "debug", "--variants", "mha,moe-mla-drope", "--context", "32", "--new-tokens", "4"]
    assert main([*argv, "--engine", "numpy", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["engine"] for r in rows] == ["numpy", "numpy"]
    assert rows[1]["kv_vs_mha"] == rows[1]["kv_cache_bytes_per_token"] / rows[0]["kv_cache_bytes_per_token"]
    assert all(r["decode_tokens_per_s"] > 0 and r["prefill_tokens_per_s"] > 0 for r in rows)
    assert main([*argv, "--engine", "numpy", "--batch", "1,16"]) == 2
    assert "one sequence at a time" in capsys.readouterr().err
    if importlib.util.find_spec("numba") is not None:
        assert main([*argv, "--engine", "numba", "--json"]) == 0
        rows = json.loads(capsys.readouterr().out)
        assert [(r["engine"], r["compiled"]) for r in rows] == [("numba", True)] * 2


def test_numpy_decoder_runs_without_torch(tmp_path) -> None:
    model = perturbed("moe-mla-rope")
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    (tmp_path / "cfg.json").write_text(json.dumps(model.cfg.to_dict()))
    want = NumpyDecoder.from_model(model).forward([5, 6, 7]).argmax()
    code = (
        "import json, sys; sys.modules['torch'] = None\n"  # any import of torch now fails
        "from moemla.config import ModelConfig\n"
        "from moemla.inference.cpu.decoder import NumpyDecoder\n"
        f"cfg = ModelConfig.from_dict(json.load(open({str(tmp_path / 'cfg.json')!r})))\n"
        f"print(NumpyDecoder.from_safetensors(cfg, {str(path)!r}).forward([5, 6, 7]).argmax())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == want
