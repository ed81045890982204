"""`moemla export --format gguf` against llama.cpp itself (issue 44), through the xllamacpp binding: the DeepSeek
flavor as deepseek2 (and mha-rope as llama) writes moemla's greedy tokens with top-5 log-probabilities within 1e-3,
caches exactly moemla's latent bytes per token, tokenizes as moemla does; other configs are one line."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moemla import accounting
from moemla.cli import main
from moemla.config import FLAVORS
from moemla.data.tokenizer import token_bytes
from moemla.inference.generate import generate_ids
from moemla.inference.sampling import greedy

from .conftest import load_run, make_run

pytest.importorskip("gguf")
xlc = pytest.importorskip("xllamacpp")

CASES = [("moe-mla-drope", "deepseek2"), ("mla-drope", "deepseek2"), ("mha-rope", "llama")]
NEW = 48  # greedy steps after the prompt, within the debug model's context of 64
PROMPTS = ("Once upon a time", "Tom had a red ball. He")
TEXTS = ("Once upon a time", "  two  spaces,\ttabs\nand lines", "def f(x):\n    return x**2", "3.14159 and 2,718",
         "naïve café — 東京 🙂", "end<|endoftext|>start")  # fmt: skip


def complete_request(prompt: list[int] | str, n: int) -> dict:
    """Greedy, n tokens past eos, top-5 log-probabilities: llama.cpp's completion request."""
    return {"prompt": prompt, "n_predict": n, "temperature": 0, "n_probs": 5, "ignore_eos": True,
            "cache_prompt": False}  # fmt: skip


@pytest.fixture(scope="module", params=CASES, ids=[v for v, _ in CASES])
def exported(request: pytest.FixtureRequest, trained_debug_run: Path, tmp_path_factory: pytest.TempPathFactory):
    """(run, export folder, architecture, model, tokenizer, llama.cpp's answers and log for the folder's file)."""
    variant, arch = request.param
    root = tmp_path_factory.mktemp(f"gguf-{variant}")
    run = make_run(trained_debug_run, root / "run", variant, seed=5, **FLAVORS["deepseek"])
    assert main(["export", str(run), str(root / "out"), "--format", "gguf", "--quantize", "f32"]) == 0
    model, tok, _ = load_run(run)
    # every request of this module's tests, answered by one llama.cpp process (the path the export's last lines
    # name): greedy continuations with log-probabilities, and each tokenizer text as text and as moemla's ids
    asks = [complete_request(tok.encode(t).ids, NEW) for t in PROMPTS]
    asks += [complete_request(x, 8) for t in TEXTS for x in (t, tok.encode(t).ids)]
    done = in_process(root / "out" / "model.gguf", json.dumps(asks))
    assert done.returncode == 0, done.stderr[-2000:]
    answers = json.loads(done.stdout.strip().splitlines()[-1])
    return run, root / "out", arch, model, tok, {"answers": answers, "log": done.stderr}


def test_llama_cpp_writes_moemlas_greedy_tokens_with_its_log_probabilities(exported) -> None:
    _, out, arch, model, tok, llama = exported
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["architecture"] == arch and manifest["type"] == "f32"
    widths = token_bytes(tok)
    for text, answer in zip(PROMPTS, llama["answers"], strict=False):
        prompt = tok.encode(text).ids
        want = generate_ids(model, prompt, greedy(NEW))
        assert len(set(want)) > 5, "a model this random should not repeat one token"
        res = answer["choices"][0]
        assert res["text"] == tok.decode(want)
        with torch.no_grad():
            logp = model(torch.tensor([prompt + want]))[0][0].log_softmax(-1)  # (T, V)
        # an entry covers one token, or several where llama.cpp held back an incomplete UTF-8 character
        pos, checked = 0, 0
        for entry in res["logprobs"]["content"]:
            k = 1
            while sum(int(widths[t]) for t in want[pos : pos + k]) < len(entry["bytes"]):
                k += 1
            if k == 1:
                assert entry["id"] == want[pos]
                row = logp[len(prompt) + pos - 1]
                for alt in entry["top_logprobs"]:
                    assert abs(alt["logprob"] - float(row[alt["id"]])) < 1e-3, (text, pos, alt)
                checked += 1
            pos += k
        assert pos == NEW and checked >= 10  # (a random model writes many partial UTF-8 characters)


# llama.cpp in a process of its own (the binding runs one server loop per process at a time): the file, 65,536
# cells (a size whose MiB its log prints exactly), fp32 cache, the log at info level; with a prompt, 16 tokens
IN_PROCESS = """
import json, sys, xllamacpp as xlc
p = xlc.CommonParams()
p.model.path, p.n_ctx, p.n_parallel, p.verbosity = sys.argv[1], 1 << 16, 1, 4
p.cache_type_k = p.cache_type_v = xlc.ggml_type.GGML_TYPE_F32
p.flash_attn_type = xlc.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_DISABLED  # its CPU kernels round via fp16
p.cpuparams.n_threads = p.cpuparams_batch.n_threads = 2
srv = xlc.Server(p)
print(json.dumps([srv.handle_completions(ask) for ask in json.loads(sys.argv[2])]))
"""


def in_process(path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", IN_PROCESS, str(path), *args], capture_output=True, text=True,
                          timeout=120)  # fmt: skip


def test_llama_cpps_cache_holds_moemlas_bytes_per_token(exported) -> None:
    """deepseek2 keeps only the latent and the RoPE key (no V cache at all): moemla's kv_cache_bytes_per_token.
    Read off llama.cpp's own log."""
    _, _, arch, model, _, llama = exported
    size = re.search(r"llama_kv_cache: size = +([\d.]+) MiB \( *(\d+) cells", llama["log"])
    assert size, llama["log"][-2000:]
    per_token = float(size.group(1)) * 2**20 / int(size.group(2))
    assert per_token == accounting.kv_cache_bytes_per_token(model.cfg, "float32")
    if arch == "deepseek2":
        assert re.search(r"V \(f32\): +0\.00 MiB", llama["log"]), "llama.cpp kept a V cache for MLA"


def test_the_gguf_tokenizer_reads_text_as_moemla_does(exported) -> None:
    """Each text (unicode, whitespace runs, code, digits, the special token) continues exactly as its moemla token
    ids do, and llama.cpp counts as many prompt tokens."""
    _, _, _, _, tok, llama = exported
    answers = llama["answers"][len(PROMPTS) :]
    for i, text in enumerate(TEXTS):
        by_text, by_ids = answers[2 * i], answers[2 * i + 1]
        assert by_text["usage"]["prompt_tokens"] == len(tok.encode(text).ids), text
        assert by_text["choices"][0]["text"] == by_ids["choices"][0]["text"], text


def test_f16_and_q8_0_load_and_generate(exported, tmp_path: Path) -> None:
    """Quantized files run in llama.cpp and are smaller; how often their greedy tokens agree with fp32 is a number
    to report (a random debug model has near-ties everywhere), not a test."""
    run, out, _, _, tok, _ = exported
    prompt = tok.encode("Once upon a time").ids
    sizes = {"f32": (out / "model.gguf").stat().st_size}
    for qtype in ("f16", "q8_0"):
        folder = tmp_path / qtype
        assert main(["export", str(run), str(folder), "--format", "gguf", "--quantize", qtype]) == 0
        sizes[qtype] = (folder / "model.gguf").stat().st_size
        done = in_process(folder / "model.gguf", json.dumps([complete_request(prompt, 16)]))
        usage = json.loads(done.stdout.strip().splitlines()[-1])[0]["usage"]
        assert usage["completion_tokens"] == 16, done.stderr[-1000:]
    assert sizes["q8_0"] < sizes["f16"] < sizes["f32"]


def test_what_llama_cpp_cannot_run_is_one_line(trained_debug_run: Path, tmp_path: Path, capsys) -> None:
    paper = make_run(trained_debug_run, tmp_path / "paper", "moe-mla-drope")
    assert main(["export", str(paper), str(tmp_path / "out"), "--format", "gguf"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--norm layernorm: needs rmsnorm" in err and not (tmp_path / "out").exists()
    assert main(["export", str(trained_debug_run), str(tmp_path / "x"), "--format", "onnx", "--quantize", "q8_0"]) == 1
    assert "GGUF type" in capsys.readouterr().err
