"""llama.cpp as an engine (issue 44, items 3 and 5): a GGUF export folder behind the Decoder interface gives the
torch model's log-probabilities, greedy tokens through moemla's one decode loop, its perplexity through `moemla
eval` (beside the run's fp32 model), llama.cpp's own decode loop in `moemla bench`; bad input is one line."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from moemla.cli import main
from moemla.config import FLAVORS
from moemla.inference.generate import generate_ids, generate_ids_batch
from moemla.inference.sampling import SamplingConfig, greedy

from .conftest import load_run, make_run, serving_cli

pytest.importorskip("gguf")
pytest.importorskip("xllamacpp")

from moemla.inference.llamacpp.engine import LlamaCppDecoder

CONTEXT = 160  # room for a prompt and 64 cached steps, beyond the debug preset's 64
PROMPTS = ("Once upon a time", "Tom had a red ball. He")


@pytest.fixture(scope="module", params=["moe-mla-drope", "mha-rope"])
def exported(request: pytest.FixtureRequest, trained_debug_run: Path, tmp_path_factory: pytest.TempPathFactory):
    """(run, f32 export folder, model, tokenizer) of a DeepSeek-flavored run with a 160-token context."""
    root = tmp_path_factory.mktemp(f"llamacpp-{request.param}")
    run = make_run(trained_debug_run, root / "run", request.param, seed=7, max_seq_len=CONTEXT,
                   **FLAVORS["deepseek"])  # fmt: skip
    assert main(["export", str(run), str(root / "f32"), "--format", "gguf", "--quantize", "f32"]) == 0
    model, tok, _ = load_run(run)
    return run, root / "f32", model, tok


def test_llama_cpp_gives_the_torch_models_log_probabilities(exported) -> None:
    """A batch of two prompts of different lengths, then cached steps: every vocabulary entry within 1e-3."""
    _, folder, model, tok = exported
    dec = LlamaCppDecoder(folder, slots=2, exact=True)
    try:
        rows = [tok.encode(t).ids for t in PROMPTS]
        steps = torch.randint(1, model.cfg.vocab_size, (6, 2), generator=torch.Generator().manual_seed(0)).tolist()
        got = [dec.prefill(rows)] + [dec.step(s) for s in steps]  # (B, V) each
        for i, row in enumerate(rows):
            ids = row + [s[i] for s in steps]
            with torch.no_grad():
                want = model(torch.tensor([ids]))[0][0].log_softmax(-1)  # (T, V)
            for k, logp in enumerate(got):
                assert (logp[i] - want[len(row) - 1 + k]).abs().max() < 1e-3, (i, k)
        assert dec.length == max(map(len, rows)) + len(steps)
    finally:
        dec.close()


def test_greedy_tokens_through_the_one_decode_loop_match_torch_for_64_cached_steps(exported) -> None:
    _, folder, model, tok = exported
    dec = LlamaCppDecoder(folder, slots=2, exact=True)
    try:
        prompts = [tok.encode(t).ids for t in PROMPTS]
        for prompt in prompts:
            want = generate_ids(model, prompt, greedy(64))
            assert len(want) == 64 and len(set(want)) > 5, "a model this random should not repeat one token"
            assert generate_ids(dec, prompt, greedy(64)) == want
        # a batch through the same loop: the rows decode together in llama.cpp's slots
        assert generate_ids_batch(dec, prompts, greedy(24)) == generate_ids_batch(model, prompts, greedy(24))
        # sampling: the same seed draws the same tokens from the same distribution
        s = SamplingConfig(temperature=0.9, top_k=20, top_p=0.95, seed=3, max_new_tokens=32)
        assert generate_ids(dec, prompts[0], s) == generate_ids(model, prompts[0], s)
    finally:
        dec.close()


def test_perplexity_scores_every_target_including_partial_characters(exported) -> None:
    """target_logprobs reads each forced token's log-probability; tokens that end inside a UTF-8 character (which
    llama.cpp does not report alone) and the end-of-text token come from the full distribution instead."""
    _, folder, model, tok = exported
    ids = [int(x) for x in np.random.default_rng(1).integers(0, model.cfg.vocab_size, 60)]
    ids[10] = 0  # <|endoftext|>
    partial = [i for i in ids[1:] if not tok.decode([i])]  # byte tokens that are no character on their own
    assert partial, "the random window should hold partial UTF-8 bytes"
    dec = LlamaCppDecoder(folder, exact=True)
    try:
        got = dec.target_logprobs(ids[:-1], ids[1:])
    finally:
        dec.close()
    with torch.no_grad():
        logp = model(torch.tensor([ids]))[0][0].log_softmax(-1)
    want = logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy()
    assert np.abs(got - want).max() < 1e-3


def test_eval_reports_the_exports_perplexity_beside_fp32(exported, tmp_path: Path, capsys) -> None:
    _, folder, _, _ = exported
    text = tmp_path / "t.txt"
    text.write_text("Once upon a time there was a cat. The cat liked milk.\n\n" * 6)
    assert main(["eval", str(folder), "--text", str(text), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["engine"] == "llama.cpp" and r["fp32"]["checkpoint"] == "step_00000001"
    assert abs(r["ppl_vs_fp32"]) < 1e-3, r  # f32 weights: llama.cpp's f16 cache is all that differs
    assert main(["eval", str(folder), "--text", str(text)]) == 0
    assert "this export (llama.cpp)" in capsys.readouterr().out


def test_generate_on_a_gguf_folder_writes_the_runs_greedy_text(exported, capsys) -> None:
    run, folder, _, _ = exported
    greedy_flags = ["--prompt", PROMPTS[0], "--temperature", "0", "--max-new-tokens", "20"]
    assert main(["generate", str(run), "--engine", "torch", *greedy_flags]) == 0
    want = capsys.readouterr().out
    assert main(["generate", str(folder), *greedy_flags]) == 0
    assert capsys.readouterr().out == want


def test_bench_times_llama_cpps_own_loop(capsys) -> None:
    flags = ["bench", "--engine", "llama.cpp", "--preset", "debug", "--flavor", "deepseek", "--context", "48",
             "--new-tokens", "16", "--variants", "moe-mla-drope,mha-rope", "--batch", "1,2", "--json"]  # fmt: skip
    assert main(flags) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["variant"], r["batch"]) for r in rows] == [(v, b) for b in (1, 2) for v in ("moe-mla-drope", "mha-rope")]
    for r in rows:
        assert r["engine"] == "llama.cpp" and r["dtype"] == "f32" and r["decode_tokens_per_s"] > 0
    mla, mha = rows[0], rows[1]
    assert mla["kv_cache_bytes_per_token"] < mha["kv_cache_bytes_per_token"]  # the latent cache, in llama.cpp
    assert main([*flags[:-1], "--quantize", "int8"]) == 0
    assert "q8_0" in capsys.readouterr().out


def test_bad_input_is_one_line(exported, tmp_path: Path, capsys) -> None:
    run, folder, _, _ = exported

    def one_line(args: list[str], *words: str) -> None:
        assert main(args) in (1, 2)  # 2: a configuration moemla refuses
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and all(w in err for w in words), err

    small = ["--preset", "debug", "--context", "48", "--new-tokens", "8", "--json"]
    one_line(["bench", "--engine", "llama.cpp", *small, "--variants", "moe-mla-drope"], "rmsnorm", "--flavor deepseek")
    one_line(["generate", str(folder), "--engine", "numba", "--prompt", "a"], "--engine llama.cpp")
    one_line(["generate", str(run), "--engine", "llama.cpp", "--prompt", "a"], "--format gguf")
    one_line(["generate", str(folder), "--quantize", "int8", "--prompt", "a"], "GGUF export", "--quantize")
    one_line(["generate", str(folder), "--prompt", "a " * 400], "--truncate")
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    gguf = bad / "model.gguf"
    gguf.write_bytes(gguf.read_bytes()[: 1 << 16])  # truncated
    one_line(["generate", str(bad), "--prompt", "a"], "model.gguf has 65,536 bytes", "export the run again")
    size = (folder / "model.gguf").stat().st_size
    gguf.write_bytes(b"GGUF" + b"\0" * (size - 4))  # foreign bytes at the recorded size: llama.cpp refuses
    one_line(["eval", str(bad), "--text", str(gguf)], "llama.cpp cannot load")
    lone = tmp_path / "lone.gguf"
    shutil.copy(folder / "model.gguf", lone)
    one_line(["generate", str(lone), "--prompt", "a"], "the folder `moemla export --format gguf`")


def test_without_the_binding_the_error_names_the_extra(exported, tmp_path: Path, monkeypatch, capsys) -> None:
    _, folder, _, _ = exported
    (tmp_path / "xllamacpp.py").write_text("raise ImportError('not installed')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # the worker process imports this stand-in first
    assert main(["generate", str(folder), "--prompt", "a"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'moemla[gguf]'" in err


def test_serve_answers_the_openai_client_from_a_gguf_folder(exported) -> None:
    """`moemla serve OUT` on a GGUF folder: llama.cpp computes, moemla's server and sampler answer (greedy: the
    torch model's text)."""
    openai = pytest.importorskip("openai")
    _, folder, model, tok = exported
    want = tok.decode(generate_ids(model, tok.encode(PROMPTS[0]).ids, greedy(8)))
    with serving_cli(folder, "--max-batch", "2") as port:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        out = client.completions.create(model=folder.name, prompt=PROMPTS[0], max_tokens=8, temperature=0)
        assert out.choices[0].text == want
